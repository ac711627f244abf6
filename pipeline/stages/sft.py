"""`sft` stage: train the embedded default (or `tiny`), or import a given
checkpoint (with `epochs: 0`, unchanged)."""

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
    params: Path = params_option("sft"),
    input: Path = input_option("prepared training split (Parquet)"),
    output: Path = output_option("the SFT model folder"),
    metrics: Path = metrics_option(),
    live: Path = output_option("DVCLive folder of the training curves", "--live"),
    model_root: Path = input_option("folder that holds local base checkpoints (a dep of this stage)", "--model-root"),
    work_dir: Path = output_option("scratch folder of checkpoints (resume); not a DVC output", "--work-dir"),
    timings: Path = timings_option(),
) -> None:
    import time

    from dvclive import Live

    from pipeline.device import default_device
    from pipeline.fingerprint import file_digest, folder_digest
    from pipeline.live import PhaseLogger
    from pipeline.models.profiles import FRESH_PROFILES, initial_model
    from pipeline.models.sources import check_model_source
    from pipeline.params import load_config
    from pipeline.reporting import write_folder, write_json
    from pipeline.schema import VQA_SCHEMA, read_rows
    from pipeline.sharding import current_shard
    from pipeline.training.sft import SFTConfig, resume_key, train_sft

    config = load_config(SFTConfig, params, "sft")
    # Under `accelerate launch` phase 2 runs data parallel, each process on its own device.
    shard = current_shard()
    check_model_source(config.model, "sft.model", model_root, packaged=FRESH_PROFILES)
    rows = read_rows(input, VQA_SCHEMA)
    vlm = initial_model(config.model, config.seed, config.vision, config.system_prompt, rows)
    if config.model not in FRESH_PROFILES and config.epochs == 0:
        typer.echo(f"sft: importing {config.model} unchanged (sft.epochs: 0)")
    vlm.model.to(shard.device or default_device())

    fresh = config.model in FRESH_PROFILES
    start_model = None if fresh else (folder_digest(config.model) if Path(config.model).is_dir() else config.model)
    key = resume_key(config, file_digest(input), start_model, shard.world_size)
    start = time.perf_counter()
    logger = Live(str(live), save_dvc_exp=False, dvcyaml=None) if shard.is_main else None
    try:
        summary, sft_run = train_sft(vlm, rows, config, fresh=fresh, log=PhaseLogger(logger) if logger else None,
                                     work_dir=work_dir, key=key)
        if logger is not None:
            for k, v in summary.items():
                logger.summary[k] = v
    finally:
        if logger is not None:
            logger.end()
    seconds = time.perf_counter() - start
    shard.wait()
    if not shard.is_main:
        return  # the main process writes the outputs and clears the checkpoints
    write_folder(output, vlm.save)
    summary.update({"model": config.model, "train_rows": len(rows),
                    "parameters": sum(p.numel() for p in vlm.model.parameters())})
    write_json(metrics, summary)
    write_json(timings, {"train_seconds": seconds, "processes": shard.world_size, "resumed_from": sft_run.resumed_from,
                         "steps_run": sft_run.steps_run, "checkpoints_saved": sft_run.checkpoints.saved})
    sft_run.checkpoints.clear()  # only once the model and the reports are written
    typer.echo(f"sft: saved {output}")


if __name__ == "__main__":
    run(app)
