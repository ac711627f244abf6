"""`train` stage: DPO / weighted DPO / MLPO with LoRA on the SFT model.

Single process (CPU or one GPU): `python -m pipeline.stages.train ...`. Several GPUs:
`accelerate launch --config_file <config> -m pipeline.stages.train ...`, with DDP as
configs/accelerate/default.yaml describes or DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml);
docs/training.md § Large models.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.stages._cli import (
    input_option,
    metrics_option,
    output_option,
    params_option,
    run,
    stage_app,
    timings_option,
)

app = stage_app(__doc__)


@app.command(help=__doc__)
def main(
    params: Path = params_option("train"),
    input: Path = input_option("scored preferences (Parquet, from `score`)"),
    model: Path = input_option("the SFT model folder: policy init and reference", "--model"),
    output: Path = output_option("merged model folder; the adapter goes in OUTPUT/adapter"),
    metrics: Path = metrics_option(),
    live: Path = output_option("DVCLive folder of the training curves", "--live"),
    work_dir: Path = output_option("scratch folder of checkpoints and the reference table (resume); not a DVC "
                                   "output", "--work-dir"),
    timings: Path = timings_option(),
) -> None:
    from dvclive import Live

    from pipeline.fingerprint import file_digest, folder_digest
    from pipeline.live import PhaseLogger
    from pipeline.models.profiles import check_model_folder, load_vlm
    from pipeline.params import load_config
    from pipeline.reporting import write_folder, write_json
    from pipeline.schema import SCORED_SCHEMA, read_rows, require_rows
    from pipeline.sharding import process_state
    from pipeline.training.preference import (
        PreferenceConfig,
        PreferenceTrainer,
        check_rationales,
        check_visual_dispreference,
        resume_key,
    )

    cfg = load_config(PreferenceConfig, params, "train")
    rows = require_rows(read_rows(input, SCORED_SCHEMA), input)
    check_rationales(rows, cfg)  # before any model is loaded
    check_visual_dispreference(rows, cfg)
    # Under `accelerate launch` each process loads the model onto its own device. The process
    # state is a singleton, so read the launcher's CPU flag here as the Accelerator would.
    state = process_state()
    check_model_folder(model)
    key = resume_key(cfg, file_digest(input), folder_digest(model), state.num_processes)
    vlm = load_vlm(model, device=state.device, quantize=None if cfg.quantize_base == "none" else cfg.quantize_base)
    trainer = PreferenceTrainer(vlm, rows, cfg, work_dir=work_dir, key=key)

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

    if state.is_main_process:
        write_folder(output, lambda folder: trainer.save(folder, full_precision=lambda: load_vlm(model, device=state.device)))
    else:
        trainer.save(None)  # the other processes only join its barriers
    if state.is_main_process:
        summary.update({"sft": str(model), "input": str(input)})
        write_json(metrics, summary)
        write_json(timings, {**trainer.timings, **trainer.reuse, "checkpoints_saved": trainer.checkpoints.saved,
                             "steps_run": summary["optimizer_steps"] - trainer.reuse["resumed_from_step"]})
        typer.echo(
            f"train: {cfg.loss} on {summary['entries']} entries, {summary['optimizer_steps']} steps, "
            f"final train reward margin {summary.get('final_train_reward_margin')}; saved {output}"
        )
    trainer.checkpoints.clear()  # only once the output and the reports are written


if __name__ == "__main__":
    run(app)
