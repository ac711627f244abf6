"""`prepare` stage: the embedded phantom benchmark, or your own VQA files, as canonical Parquet
train and test splits, and the report-generation benchmark (evaluated only) as reports.parquet
(docs/benchmark.md, docs/data-formats.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.stages._cli import metrics_option, output_option, params_option, run, stage_app

app = stage_app(__doc__)


@app.command(help=__doc__)
def main(
    params: Path = params_option("prepare"),
    output: Path = output_option("folder that receives train.parquet, test.parquet, lesions.parquet (the lesion "
                                 "annotations of the train rows that have one) and reports.parquet (the "
                                 "report-generation benchmark; no rows when there is none)"),
    skipped: Path = output_option("every row left out by `files.skip_bad`, with its reason (JSON list)", "--skipped"),
    metrics: Path = metrics_option(),
) -> None:
    from pipeline.data.prepare import PrepareConfig, prepare_splits
    from pipeline.params import load_config
    from pipeline.reporting import write_json
    from pipeline.schema import LESION_SCHEMA, REPORT_SCHEMA, VQA_SCHEMA, write_rows

    config = load_config(PrepareConfig, params, "prepare")
    splits, skipped_rows, report = prepare_splits(config)
    for split in ("train", "test"):
        write_rows(splits[split], output / f"{split}.parquet", VQA_SCHEMA)
    write_rows(splits["lesions"], output / "lesions.parquet", LESION_SCHEMA)
    write_rows(splits["reports"], output / "reports.parquet", REPORT_SCHEMA)
    write_json(skipped, skipped_rows)
    write_json(metrics, report)
    if skipped_rows:
        typer.echo(f"prepare: skipped {len(skipped_rows)} bad rows (files.skip_bad: true); "
                   f"each one and its reason: {skipped}", err=True)
    leakage = report["leakage"]
    if leakage["allowed"] and (leakage["image"]["test_rows"] or leakage["question"]["test_rows"]):
        typer.echo(f"prepare: kept a leaking test split (files.allow_leakage: true): {leakage['image']['test_rows']} "
                   f"test rows on train images, {leakage['question']['test_rows']} repeating a train question "
                   f"about the same image; examples under `leakage` in {metrics}", err=True)
    typer.echo(f"prepare: {len(splits['train'])} train rows, {len(splits['test'])} test rows, "
               f"{len(splits['reports'])} report rows -> {output}")


if __name__ == "__main__":
    run(app)
