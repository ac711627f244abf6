"""`sample` stage: k dispreferred candidates per pool entry.

`sample.source: self` (the default): k graded candidates by token replacement under visual-token
dropout, this model's own misreadings (HSCR §3.1). `sample.source: external`: k wrong answers
written by another model, a local causal LM or any OpenAI-compatible endpoint, through the judge
machinery and its response cache `--cache` (HSCR Table 3's baseline;
`pipeline.external_dispreferred`, docs/sampling.md). Both write the same CANDIDATES_SCHEMA rows.

Finished batches are kept under `--work-dir` as they complete, keyed by the content of the pool
and the model, the config and the code version; an interrupted run started again redoes only
the unfinished batches (`pipeline.resume`).

Under `accelerate launch --num_processes N -m pipeline.stages.sample ...` the batches of
`source: self` are shared out over the N processes, each with its model on its own device; the main
process writes every output, the same bytes as one process (`pipeline.sharding`, docs/sampling.md).
`source: external` and the visual dispreference are not shared out: the main process does them.
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
    cache: Path = output_option("source external: the writer's response cache (SQLite; resume); not a DVC output",
                                "--cache"),
    # Not `input_option`: it need not exist unless source external names a local writer folder.
    model_root: Path = typer.Option(..., "--model-root", file_okay=False,
                                    help="source external: folder that holds local writer models (a dep)"),
    lesions: Path = input_option("lesion masks of the train rows that have one (prepare's lesions.parquet), for "
                                 "visual_dispreference", "--lesions"),
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
    from pipeline.sharding import current_shard

    config = load_config(SampleConfig, params, "sample")
    if config.source == "external":
        from pipeline.external_dispreferred import check_writer, load_external_prompts, run_external
        from pipeline.judges.backends.hf import PACKAGED
        from pipeline.models.sources import check_model_source

        prompts = load_external_prompts(config.external.prompts)
        check_writer(config.external, prompts)
        if config.external.writer.backend == "hf":
            check_model_source(config.external.writer.model, "sample.external.writer.model", model_root,
                               packaged=[PACKAGED])
    rows = require_rows(read_rows(input, POOL_SCHEMA), input)
    # What made the candidates; the degraded view's settings only where it made them.
    settings = {"source": config.source, "k": config.k} if config.source == "external" else {
        "source": config.source, "mode": config.mode, "mask_strategy": config.mask_strategy,
        "mask_ratio": config.mask_ratio, "k": config.k}
    extra_metrics: dict = {}
    extra_timings: dict = {}
    shard = current_shard()  # one process: the plain run; under `accelerate launch`: this process's batches
    if config.source == "self":
        vlm = load_vlm(model, device=shard.device)
        start = time.perf_counter()
        done = sample_pool(vlm, rows, config, work_dir, {"pool": file_digest(input), "model": folder_digest(model)},
                           shard=shard)
        if not shard.is_main:
            return  # its batches are on disk: the main process writes every output and clears the work folder
    elif not shard.is_main:
        return  # source external is not shared out: the main process does all of it
    else:
        start = time.perf_counter()

        def on_failure(report: dict, times: dict) -> None:
            write_json(metrics, {"entries": len(rows), **settings, "external": report})
            write_json(timings, {"seconds": time.perf_counter() - start, **times})

        inputs = {"pool": file_digest(input), "model": folder_digest(model)}
        result = run_external(rows, config, prompts, cache, lambda: load_vlm(model, device=shard.device),
                              work_dir, inputs, on_failure=on_failure)
        done = result.done
        extra_metrics, extra_timings = {"external": result.metrics}, result.timings
    table = done.table
    visual_summary: dict = {"mode": "none"}
    if config.visual_dispreference.mode != "none":
        table, visual_summary = _add_visual_dispreferred(table, rows, config, lesions,
                                                         lambda: load_vlm(model, device=shard.device))
    write_table(table, output, CANDIDATES_SCHEMA)
    summary = summarize_candidates(table.to_pylist())
    summary.update({**settings, **extra_metrics, "visual_dispreference": visual_summary})
    write_json(metrics, summary)
    # The writer's cache hits depend on what earlier runs left in the cache: they go with the
    # wall-clock values, out of the cached metrics (as for `score`).
    write_json(timings, {"seconds": time.perf_counter() - start, "batches": done.batches, "reused": done.reused,
                         "computed": done.computed, **extra_timings})
    clear_all(work_dir)  # only once the output and the reports are written
    written = "" if config.source == "self" else (
        f" (external writer {config.external.writer.name}: {summary['external']['entries_without_candidates']} "
        f"entries without candidates, cache hits {extra_timings['cache']['hits']}, asked "
        f"{extra_timings['cache']['asked']})"
    )
    typer.echo(f"sample: {summary['candidates']} candidates for {summary['entries']} entries{written} -> {output}")


def _add_visual_dispreferred(table, rows: list[dict], config, lesions: Path, load):
    """The candidates table with its `visual_dispreferred` column filled (MMedPO §3.1), and its summary."""
    import pyarrow as pa

    from pipeline.schema import LESION_SCHEMA, VISUAL_DISPREFERRED_TYPE, read_rows
    from pipeline.visual_dispreference import build_visual_dispreferred

    masks = {r["id"]: r["mask"] for r in read_rows(lesions, LESION_SCHEMA)}
    values, summary = build_visual_dispreferred(rows, config.visual_dispreference, config.seed, masks, load)
    column = pa.array([values.get(i) for i in table.column("id").to_pylist()], type=VISUAL_DISPREFERRED_TYPE)
    at = table.schema.get_field_index("visual_dispreferred")
    typer.echo(f"sample: visual dispreference ({summary['mode']}) for {summary['entries']} entries, "
               f"{summary['entries_without']} without a region")
    return table.set_column(at, "visual_dispreferred", column), summary


if __name__ == "__main__":
    run(app)
