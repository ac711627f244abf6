"""`report` stage: the run's metrics report, `reports/metrics.json`, and the HSCR Fig. 4 log-prob
gaps.

It reads the per-model reports of `evaluate` (one per `--evaluation`), computes every `--model`'s
log-prob gaps log p(ground truth) − log p(hallucinated answer) on held-out test entries (a
seeded, modality-stratified sample of `--test`, `evaluate.heldout_gap`, whose hallucinated candidates the
`--sampler` model makes as the `sample` stage does: `pipeline.heldout_gaps`) and, labelled
`<model>_logprob_gap_train`, on the training preference entries (`--preferences`, against the
top-ranked dispreferred answer), and writes one report with every model's metrics, its gap
summaries and the `<model>_minus_<first model>` deltas, the file `dvc metrics diff` compares. Each
model entry (blind controls too) also gets `legacy`: LLaVA-Med's own `run_eval.py` numbers,
quirks included, from the per-question predictions under `--predictions`
(`pipeline.legacy_metrics`), to put beside published tables. The held-out gap histograms go to
`--plots`, one CSV per modality (a DVC plot). Gap batches are kept under `--work-dir` as they finish, like
`evaluate`'s. Every `degenerate` answer type `evaluate` recorded (predictions mostly empty, or
one string) is warned about again at the end, loudly on stderr: it is the last thing a run prints.
"""

from __future__ import annotations

import csv
import json
import time
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
from pipeline.stages.evaluate import model_specs, warn_degenerate

app = stage_app(__doc__)


@app.command(help=__doc__)
def main(
    params: Path = params_option("evaluate"),
    evaluation: list[Path] = typer.Option(..., "--evaluation", exists=True, dir_okay=False,
                                          help="an `evaluate` metrics report; repeatable"),
    model: list[str] = typer.Option(..., "--model", help="NAME=FOLDER of an evaluated model, for its log-prob "
                                    "gaps; repeatable, the first is the baseline of the deltas"),
    predictions: Path = input_option("folder of the per-question predictions of `evaluate` (<model>.parquet), "
                                     "for the legacy (LLaVA-Med run_eval.py) metrics", "--predictions"),
    preferences: Path = input_option("scored preference entries (the training pool), for the training-pool "
                                     "log-prob gaps and to check the held-out entries are not among them",
                                     "--preferences"),
    test: Path = input_option("the test split, whose held-out entries get the log-prob gaps (HSCR Fig. 4)",
                              "--test"),
    sampler: str = typer.Option(..., "--sampler", help="NAME of the `--model` whose hallucinated candidates the "
                                "held-out entries get (the SFT model, as in `sample`)"),
    plots: Path = output_option("folder of the log-prob gap histograms, one CSV per modality", "--plots"),
    metrics: Path = metrics_option(),
    work_dir: Path = output_option("scratch folder of finished batches (resume); not a DVC output", "--work-dir"),
    timings: Path = timings_option(),
) -> None:
    from pipeline.errors import DataError
    from pipeline.evaluation import EvaluateConfig, combine_reports, logprob_gap_report, prediction_models
    from pipeline.fingerprint import file_digest, folder_digest
    from pipeline.heldout_gaps import TRAIN_DATA, heldout_gap_report
    from pipeline.legacy_metrics import legacy_reports, legacy_reports_by_dataset
    from pipeline.models.profiles import load_vlm
    from pipeline.params import load_config
    from pipeline.reporting import write_json
    from pipeline.resume import clear_all
    from pipeline.schema import PREDICTION_SCHEMA, SCORED_SCHEMA, VQA_SCHEMA, read_rows
    from pipeline.self_contrast import SampleConfig

    start = time.perf_counter()
    config = load_config(EvaluateConfig, params, "evaluate")
    sample_config = load_config(SampleConfig, params, "sample")
    models = model_specs(model)
    evaluations = []
    for path in evaluation:
        try:
            evaluations.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e}); is it an `evaluate` metrics report?") from e
        missing = [key for key in prediction_models(evaluations[-1]) if "degenerate" not in evaluations[-1][key]]
        if missing:  # checked before any model loads
            raise DataError(f"{path}: no `degenerate` entry for {missing}: written by an older `evaluate`; "
                            "run it again")
    pref_rows = read_rows(preferences, SCORED_SCHEMA)
    digests = {name: folder_digest(folder) for name, folder in models}
    train_gaps = logprob_gap_report(load_vlm, models, pref_rows, config.batch_size, work_dir / "train",
                                    {"preferences": file_digest(preferences), "models": digests})
    test_rows = read_rows(test, VQA_SCHEMA)
    gaps = heldout_gap_report(load_vlm, models, sampler, test_rows, {r["id"] for r in pref_rows},
                              sample_config, config.heldout_gap, config.batch_size, work_dir / "heldout",
                              {"test": file_digest(test), "models": digests})
    # The training-pool gaps only as a labelled aside: the plots are the held-out ones.
    labelled = {f"{key}_train": {"data": TRAIN_DATA, **value} for key, value in train_gaps.report.items()}
    report = combine_reports([name for name, _ in models], evaluations, {**gaps.report, **labelled})
    tables = {key: read_rows(predictions / f"{key}.parquet", PREDICTION_SCHEMA) for key in prediction_models(report)}
    for key, legacy in legacy_reports(tables).items():
        report[key] = {**report[key], "legacy": legacy}
    dataset_of = {r["id"]: r["dataset"] for r in test_rows}
    for key, by_dataset in legacy_reports_by_dataset(tables, dataset_of).items():  # a split of several benchmarks
        for dataset, legacy in by_dataset.items():
            report[key]["by_dataset"][dataset]["legacy"] = legacy
    plots.mkdir(parents=True, exist_ok=True)
    for stale in plots.glob("*.csv"):  # a modality no longer present must not linger in the plot
        stale.unlink()
    for modality, table in gaps.histograms.items():
        _write_csv(plots / f"{modality}.csv", table)
    write_json(metrics, report)
    work = {"heldout": gaps.work, "train": train_gaps.work}
    total = {k: sum(p[k] for part in work.values() for p in part.values()) for k in ("batches", "reused", "computed")}
    write_json(timings, {"seconds": round(time.perf_counter() - start, 3), **total,
                         "resumed_from": str(work_dir) if total["reused"] else None, "models": work})
    clear_all(work_dir)
    names = [name for name, _ in models]
    for name in names[1:]:
        delta = report[f"{name}_minus_{names[0]}"]
        typer.echo(f"report: {name} − {names[0]}: closed {_signed(delta['closed_accuracy'])}, "
                   f"open {_signed(delta['open_recall'])}")
    for key in tables:
        warn_degenerate(key, report[key]["degenerate"])


def _write_csv(path: Path, table: list[dict]) -> None:
    """Write rows as CSV atomically (a temporary name, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    tmp.replace(path)


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} pts"


if __name__ == "__main__":
    run(app)
