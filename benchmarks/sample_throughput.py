"""Sampling throughput: the batched `sample_batch` against a one-entry-at-a-time loop of the same code.

    python benchmarks/sample_throughput.py [--model models/sft] [--entries 32] [--batch-size 16] [--mode replace]

Writes reports/benchmarks/sample_throughput.json (and prints it). Tokens/s counts the teacher-forced
answer tokens of both views plus the candidates' scored tokens (decode mode: plus generated ones).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import typer

from pipeline.params import project_config
from pipeline.self_contrast import SampleConfig, sample_batch
from pipeline.training.sft import SFTConfig

app = typer.Typer(add_completion=False)


def _load(model: str):
    from pipeline.models.profiles import build_demo, load_vlm

    if model == "demo":
        from pipeline.device import default_device

        sft = project_config(SFTConfig, "sft")
        vlm = build_demo(sft.seed, sft.vision, sft.system_prompt)
        vlm.model.to(default_device())
        return vlm, "demo (built, untrained)"
    return load_vlm(model), model


def _tokens(out: list[dict]) -> int:
    return sum(2 * len(r["chosen_token_ids"]) + sum(len(c["token_ids"]) for c in r["candidates"]) for r in out)


def _run(vlm, rows, cfg, batch_size: int) -> tuple[float, int]:
    if vlm.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(rows), batch_size):
        tokens += _tokens(sample_batch(vlm, rows[i:i + batch_size], cfg))
    if vlm.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


@app.command()
def main(
    model: str = typer.Option("models/sft", help="model folder, or 'demo' for a freshly built default"),
    data: Path = typer.Option(Path("data/prepared/train.parquet")),
    entries: int = typer.Option(32),
    batch_size: int = typer.Option(16),
    mode: str = typer.Option("replace"),
    out: Path = typer.Option(Path("reports/benchmarks/sample_throughput.json")),
) -> None:
    from pipeline.schema import VQA_SCHEMA, read_rows

    if model == "models/sft" and not Path(model, "config.json").exists():
        model = "demo"
    vlm, name = _load(model)
    rows = read_rows(data, VQA_SCHEMA)[:entries]
    cfg = project_config(SampleConfig, "sample", mode=mode)
    sample_batch(vlm, rows[:2], cfg)  # warm-up
    results = {}
    for label, bs in (("batched", batch_size), ("one_at_a_time", 1)):
        seconds, tokens = _run(vlm, rows, cfg, bs)
        results[label] = {"batch_size": bs, "seconds": round(seconds, 3),
                          "entries_per_second": round(len(rows) / seconds, 3),
                          "tokens_per_second": round(tokens / seconds, 1)}
    results["speedup"] = round(results["batched"]["entries_per_second"]
                               / results["one_at_a_time"]["entries_per_second"], 2)
    device = vlm.device
    report = {
        "model": name,
        "mode": mode,
        "entries": len(rows),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "dtype": str(vlm.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "results": results,
    }
    existing = json.loads(out.read_text()) if out.exists() else {}
    existing[f"{report['device']}/{mode}"] = report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(existing, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app()
