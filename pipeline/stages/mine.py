"""`mine` stage: choose the pool of training entries preferences are built from.

`balanced` and `random` need nothing but the split. `hard` (CheXPO) has the SFT model (`--model`)
answer a stratified sample of the split (`mine.hard.candidates`) and embeds those entries with a sentence embedder (`mine.hard.embedder`, a local one
under `--model-root`); those answers and visual vectors are kept under `--work-dir` as they are
computed, so an interrupted run redoes only the unfinished batches.
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
    params: Path = params_option("mine"),
    input: Path = input_option("prepared training split (Parquet)"),
    model: Path = input_option("the SFT model folder (read by strategy hard)", "--model"),
    model_root: Path = input_option("folder that holds local embedders (a dep of this stage)", "--model-root"),
    output: Path = output_option("pool of mined entries (Parquet)"),
    metrics: Path = metrics_option(),
    work_dir: Path = output_option("scratch folder of strategy hard's finished batches (resume); not a DVC "
                                   "output", "--work-dir"),
    timings: Path = timings_option(),
) -> None:
    import time

    from pipeline.mining import MineConfig, mine, mining_summary
    from pipeline.params import load_config
    from pipeline.reporting import write_json
    from pipeline.resume import clear_all
    from pipeline.schema import POOL_SCHEMA, VQA_SCHEMA, read_rows, write_rows

    config = load_config(MineConfig, params, "mine")
    start = time.perf_counter()
    run_report: dict = {}
    if config.strategy == "hard":
        from pipeline.fingerprint import file_digest, folder_digest
        from pipeline.hard_mining import mine_hard, sample_candidates, split_signals
        from pipeline.models.profiles import check_model_folder, load_vlm
        from pipeline.models.sources import check_model_source
        from pipeline.rerank import PACKAGED_ALIASES, load_embedder
        from pipeline.schema import require_rows

        check_model_source(config.hard.embedder, "mine.hard.embedder", model_root, packaged=PACKAGED_ALIASES)
        check_model_folder(model)
        rows = require_rows(read_rows(input, VQA_SCHEMA), input)
        answered = [rows[i] for i in sample_candidates(rows, config.hard.candidates, config.seed)]
        inputs = {"split": file_digest(input), "model": folder_digest(model), "embedder": config.hard.embedder,
                  "candidates": [row["id"] for row in answered]}
        signals = split_signals(load_vlm(model), load_embedder(config.hard.embedder), answered, config.hard,
                                work_dir, inputs)
        result = mine_hard(answered, config.size, config.seed, config.hard, signals.answers, signals.visual,
                           signals.question)
        pool = result.pool
        report = {**mining_summary(pool, requested=config.size, available=len(answered), config=config,
                                   split=rows),
                  "candidates": len(answered), **result.report}
        run_report["reuse"] = signals.reuse
    else:
        rows = read_rows(input, VQA_SCHEMA)
        pool, report = mine(rows, config)
    if report["capped"]:
        typer.echo(
            f"warning: mine.size={config.size} but {len(pool)} of the {len(rows)} entries of {input} could be "
            f"chosen; the pool takes {len(pool)} (reported as `capped` in {metrics})",
            err=True,
        )
    write_rows(pool, output, POOL_SCHEMA)
    write_json(metrics, report)
    write_json(timings, {"seconds": time.perf_counter() - start, **run_report})
    clear_all(work_dir)  # only once the outputs are written
    typer.echo(f"mine {config.strategy}: {len(pool)} of {len(rows)} entries -> {output}")


if __name__ == "__main__":
    run(app)
