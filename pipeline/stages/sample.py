"""`sample` stage: k graded dispreferred candidates per pool entry (HSCR §3.1).

Finished batches are kept under `--work-dir` as they complete, keyed by the content of the pool
and the model, the config and the code version; an interrupted run started again redoes only
the unfinished batches (`pipeline.resume`).
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
    params: Path = params_option("sample"),
    input: Path = input_option("pool of mined entries (Parquet)"),
    model: Path = input_option("the SFT model folder", "--model"),
    output: Path = output_option("candidates per entry (Parquet)"),
    metrics: Path = metrics_option(),
    work_dir: Path = output_option("scratch folder of finished batches (resume); not a DVC output", "--work-dir"),
    timings: Path = timings_option(),
) -> None:
    import time

    from pipeline.fingerprint import file_digest, folder_digest
    from pipeline.models.profiles import load_vlm
    from pipeline.params import load_config
    from pipeline.reporting import write_json
    from pipeline.resume import clear_all
    from pipeline.schema import CANDIDATES_SCHEMA, POOL_SCHEMA, read_rows, require_rows, write_table
    from pipeline.self_contrast import SampleConfig, sample_pool, summarize_candidates

    config = load_config(SampleConfig, params, "sample")
    rows = require_rows(read_rows(input, POOL_SCHEMA), input)
    vlm = load_vlm(model)
    start = time.perf_counter()
    done = sample_pool(vlm, rows, config, work_dir, {"pool": file_digest(input), "model": folder_digest(model)})
    write_table(done.table, output, CANDIDATES_SCHEMA)
    summary = summarize_candidates(done.table.to_pylist())
    summary.update({"mode": config.mode, "mask_ratio": config.mask_ratio, "k": config.k})
    write_json(metrics, summary)
    write_json(timings, {"seconds": time.perf_counter() - start, "batches": done.batches, "reused": done.reused,
                         "computed": done.computed})
    clear_all(work_dir)  # only once the output and the reports are written
    typer.echo(f"sample: {summary['candidates']} candidates for {summary['entries']} entries -> {output}")


if __name__ == "__main__":
    run(app)
