"""`train` stage: DPO / weighted DPO / MLPO with LoRA on the SFT model.

Single process (CPU or one GPU): `python -m pipeline.stages.train ...`. Several GPUs:
`accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m pipeline.stages.train ...`
(see configs/accelerate/default.yaml and docs/training.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from pipeline.stages._cli import input_option, metrics_option, output_option, params_option, run, stage_app

app = stage_app(__doc__)


@app.command(help=__doc__)
def main(
    params: Path = params_option("train"),
    input: Path = input_option("scored preferences (Parquet, from `score`)"),
    model: Path = input_option("the SFT model folder: policy init and reference", "--model"),
    output: Path = output_option("merged model folder; the adapter goes in OUTPUT/adapter"),
    metrics: Path = metrics_option(),
    live: Path = output_option("DVCLive folder of the training curves", "--live"),
) -> None:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from dvclive import Live

    from pipeline.live import PhaseLogger
    from pipeline.models.profiles import load_vlm
    from pipeline.params import load_config
    from pipeline.reporting import write_json
    from pipeline.schema import SCORED_SCHEMA, read_rows, require_rows
    from pipeline.training.preference import PreferenceConfig, PreferenceTrainer

    cfg = load_config(PreferenceConfig, params, "train")
    rows = require_rows(read_rows(input, SCORED_SCHEMA), input)
    # Under `accelerate launch` each process loads the model onto its own device. The process
    # state is a singleton, so read the launcher's CPU flag here as the Accelerator would.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    vlm = load_vlm(model, device=state.device)
    trainer = PreferenceTrainer(vlm, rows, cfg)

    logger = Live(str(live), save_dvc_exp=False, dvcyaml=None) if state.is_main_process else None
    trainer.log = PhaseLogger(logger) if logger is not None else None
    try:
        summary = trainer.train()
        if logger is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    logger.summary[k] = v
    finally:
        if logger is not None:
            logger.end()

    if state.is_main_process and output.exists():
        shutil.rmtree(output)
    trainer.save(output)
    if state.is_main_process:
        summary.update({"sft": str(model), "input": str(input)})
        write_json(metrics, summary)
        typer.echo(
            f"train: {cfg.loss} on {summary['entries']} entries, {summary['optimizer_steps']} steps, "
            f"final train reward margin {summary.get('final_train_reward_margin')}; saved {output}"
        )


if __name__ == "__main__":
    run(app)
