"""`sft` stage: train the embedded default (or `tiny`), or import a given checkpoint unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import typer
from dvclive import Live

from pipeline.device import default_device
from pipeline.live import PhaseLogger
from pipeline.params import load_params, section
from pipeline.reporting import write_json
from pipeline.schema import VQA_SCHEMA, read_rows

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    train: Path = typer.Option(Path("data/prepared/train.parquet")),
    out: Path = typer.Option(Path("models/sft")),
    metrics: Path = typer.Option(Path("reports/sft.json")),
    live_dir: Path = typer.Option(Path("reports/live/sft")),
) -> None:
    from pipeline.models.profiles import build_demo, build_tiny, load_vlm
    from pipeline.models.vlm import DEFAULT_SYSTEM_PROMPT
    from pipeline.training.sft import SFTConfig, train_sft

    cfg = section(load_params(params), "sft")
    profile = str(cfg.get("model", "demo"))
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    fields = set(SFTConfig.__dataclass_fields__)
    sft_cfg = SFTConfig(**{k: v for k, v in cfg.items() if k in fields})
    rows = read_rows(train, VQA_SCHEMA)

    if profile == "tiny":
        texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
        vlm = build_tiny(texts, seed=seed, vision=cfg.get("vision"))
    elif profile == "demo":
        vlm = build_demo(seed=seed, vision=cfg.get("vision"), system_prompt=cfg.get("system_prompt", DEFAULT_SYSTEM_PROMPT))
    else:
        # A given checkpoint: its vision tower is pretrained, so phase 1 never runs on it.
        vlm = load_vlm(profile)
        sft_cfg.vision_epochs = 0
        if sft_cfg.epochs == 0:
            typer.echo(f"sft: importing {profile} unchanged (sft.epochs: 0)")

    vlm.model.to(default_device())

    with Live(str(live_dir), save_dvc_exp=False, dvcyaml=None) as live:
        summary = train_sft(vlm, rows, sft_cfg, log=PhaseLogger(live))
        for k, v in summary.items():
            live.summary[k] = v
    if out.exists():
        shutil.rmtree(out)
    vlm.save(out)
    summary.update({"model": profile, "train_rows": len(rows),
                    "parameters": sum(p.numel() for p in vlm.model.parameters())})
    write_json(metrics, summary)
    typer.echo(f"sft: saved {out}")


if __name__ == "__main__":
    app()
