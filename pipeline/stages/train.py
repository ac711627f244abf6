"""`train` stage: DPO / weighted DPO / MLPO with LoRA on the SFT model -> models/aligned.

Single process (CPU or one GPU): `python -m pipeline.stages.train`. Several GPUs:
`accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m pipeline.stages.train`
(see configs/accelerate/default.yaml and docs/training.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from pipeline.params import load_params, section
from pipeline.reporting import write_json
from pipeline.schema import SCORED_SCHEMA, read_rows

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    input: Path = typer.Option(Path("data/scored.parquet"), help="scored preferences (SCORED_SCHEMA)"),
    sft: Path = typer.Option(Path("models/sft"), help="the SFT checkpoint: policy init and reference"),
    out: Path = typer.Option(Path("models/aligned"), help="merged model; the adapter goes in OUT/adapter"),
    metrics: Path = typer.Option(Path("reports/train.json")),
    live_dir: Path = typer.Option(Path("reports/live/train")),
) -> None:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from dvclive import Live

    from pipeline.live import PhaseLogger
    from pipeline.models.profiles import load_vlm
    from pipeline.training.preference import PreferenceConfig, PreferenceTrainer

    cfg = PreferenceConfig.from_params(dict(section(load_params(params), "train")))
    rows = read_rows(input, SCORED_SCHEMA)
    # Under `accelerate launch` each process loads the model onto its own device. The process
    # state is a singleton, so read the launcher's CPU flag here as the Accelerator would.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    vlm = load_vlm(sft, device=state.device)
    trainer = PreferenceTrainer(vlm, rows, cfg)

    live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=None) if state.is_main_process else None
    trainer.log = PhaseLogger(live) if live is not None else None
    try:
        summary = trainer.train()
        if live is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    live.summary[k] = v
    finally:
        if live is not None:
            live.end()

    if state.is_main_process and out.exists():
        shutil.rmtree(out)
    trainer.save(out)
    if state.is_main_process:
        summary.update({"sft": str(sft), "input": str(input)})
        write_json(metrics, summary)
        typer.echo(
            f"train: {cfg.loss} on {summary['entries']} entries, {summary['optimizer_steps']} steps, "
            f"final train reward margin {summary.get('final_train_reward_margin')}; saved {out}"
        )


if __name__ == "__main__":
    app()
