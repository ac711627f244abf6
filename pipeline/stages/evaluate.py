"""`evaluate` stage: each `--model` and its blind control on the test split.

dvc.yaml runs it once per model (`evaluate@sft`, `evaluate@aligned`), so an ablation that changes
only the aligned model leaves `evaluate@sft` cached; the `report` stage combines the per-model
reports into `reports/metrics.json`. Each model's predictions and blind predictions are kept
under `--work-dir` batch by batch as they finish, keyed by the content of the model folder and the
input, the config and the code version; an interrupted run started again redoes only the
unfinished batches (`pipeline.resume`), and the batches reused and computed go to the `--timings`
report. Each batch holds one answer type and decodes with its `evaluate.max_new_tokens` cap.

A model (or blind control) whose predictions of an answer type are mostly empty, or one string,
gets a loud warning on stderr and `degenerate` in its metrics (`pipeline.metrics.degeneracy`).
The predictions are also written as lmms-eval `--log_samples` JSONL under `--log-samples`
(docs/evaluation.md § Predictions for other tools).

Each model (and its blind control) also writes a report for every row of the report-generation
benchmark(s) under `--reports` (resumable like the answers); the reports, each with its ROUGE-L
and METEOR, go to `--report-output` (<name>.parquet, <name>_blind.parquet; no rows when the
benchmark has none) and the per-benchmark BLEU-1..4, ROUGE-L and METEOR to the metrics under
`<name>_report_generation` (docs/evaluation.md § Report generation).

Under `accelerate launch --num_processes N -m pipeline.stages.evaluate ...` the batches are shared
out over the N processes, each with its model on its own device; the main process scores them and
writes every output, the same bytes as one process (`pipeline.sharding`, docs/evaluation.md).
"""

from __future__ import annotations

import time
from functools import partial
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
    params: Path = params_option("evaluate"),
    input: Path = input_option("test split (Parquet)"),
    reports: Path = input_option("report-generation benchmark (Parquet, data/prepared/reports.parquet)", "--reports"),
    model: list[str] = typer.Option(..., "--model", help="NAME=FOLDER of a model to evaluate; repeatable"),
    output: Path = output_option("folder of per-question predictions: <name>.parquet and <name>_blind.parquet "
                                 "per model"),
    log_samples: Path = output_option("folder of the per-question predictions as lmms-eval `--log_samples` JSONL: "
                                      "<name>_samples.jsonl and <name>_blind_samples.jsonl per model", "--log-samples"),
    report_output: Path = output_option("folder of the generated reports: <name>.parquet and <name>_blind.parquet "
                                        "per model", "--report-output"),
    metrics: Path = metrics_option(),
    work_dir: Path = output_option("scratch folder of finished batches (resume); not a DVC output", "--work-dir"),
    timings: Path = timings_option(),
) -> None:
    from pipeline.evaluation import EvaluateConfig, evaluate_models, lmms_eval_samples
    from pipeline.fingerprint import file_digest, folder_digest
    from pipeline.metrics import degeneracy
    from pipeline.models.profiles import load_vlm
    from pipeline.params import load_config
    from pipeline.reporting import write_json, write_jsonl
    from pipeline.resume import clear_all
    from pipeline.schema import (
        PREDICTION_SCHEMA,
        REPORT_PREDICTION_SCHEMA,
        REPORT_SCHEMA,
        VQA_SCHEMA,
        read_rows,
        require_rows,
        write_rows,
    )
    from pipeline.sharding import current_shard

    start = time.perf_counter()
    config = load_config(EvaluateConfig, params, "evaluate")
    models = model_specs(model)
    rows = require_rows(read_rows(input, VQA_SCHEMA), input)
    report_rows = read_rows(reports, REPORT_SCHEMA)  # no rows: no report benchmark (prepare.phantom.n_report 0)

    def progress(name: str, results: dict) -> None:
        head, blind = results[name], results[f"{name}_blind"]
        typer.echo(
            f"evaluate {name}: closed {_pct(head['closed_accuracy'])} (blind {_pct(blind['closed_accuracy'])}), "
            f"open {_pct(head['open_recall'])} (blind {_pct(blind['open_recall'])})"
        )

    inputs = {"input": file_digest(input), "reports": file_digest(reports),
              "models": {name: folder_digest(folder) for name, folder in models}}
    shard = current_shard()  # one process: the plain run; under `accelerate launch`: this process's batches
    done = evaluate_models(partial(load_vlm, device=shard.device), models, rows, config, work_dir, inputs,
                           on_model=progress, report_rows=report_rows, shard=shard)
    if not shard.is_main:
        return  # its batches are on disk: the main process writes every output and clears the work folder
    for key, pred_rows in done.predictions.items():
        done.report[key]["degenerate"] = degeneracy(pred_rows)
        warn_degenerate(key, done.report[key]["degenerate"])
        write_rows(pred_rows, output / f"{key}.parquet", PREDICTION_SCHEMA)
        write_jsonl(log_samples / f"{key}_samples.jsonl", lmms_eval_samples(pred_rows))
    for name, _ in models:
        for key in (name, f"{name}_blind"):
            write_rows(done.report_predictions.get(key, []), report_output / f"{key}.parquet", REPORT_PREDICTION_SCHEMA)
            for bench, scores in done.report.get(f"{key}_report_generation", {}).items():
                typer.echo(f"evaluate {key}: {bench} reports: BLEU-4 {scores['bleu_4']:.3f}, "
                           f"ROUGE-L {scores['rouge_l']:.3f}, METEOR {scores['meteor']:.3f} (n={scores['n']})")
    write_json(metrics, done.report)
    passes = [p for per_model in done.work.values() for p in per_model.values()]
    total = {k: sum(p[k] for p in passes) for k in ("batches", "reused", "computed")}
    write_json(timings, {"seconds": round(time.perf_counter() - start, 3), **total,
                         "resumed_from": str(work_dir) if total["reused"] else None, "models": done.work})
    # Only now, with every output written, are the finished batches no longer needed.
    clear_all(work_dir)
    if total["reused"]:
        typer.echo(f"evaluate: reused {total['reused']}/{total['batches']} batches from {work_dir}")


def model_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`--model NAME=FOLDER` options as (name, folder) pairs, every folder checked before the first
    model loads; a name given twice is an error (its outputs would overwrite each other)."""
    from pipeline.models.profiles import check_model_folder

    models: list[tuple[str, str]] = []
    for spec in specs:
        name, _, folder = spec.partition("=")
        if not name or not folder:
            raise typer.BadParameter(f"--model takes NAME=FOLDER, got {spec!r}")
        if name in dict(models):
            raise typer.BadParameter(f"--model {name}=... is given twice")
        check_model_folder(Path(folder))
        models.append((name, folder))
    return models


def warn_degenerate(model: str, report: dict) -> None:
    """Print each flagged answer type of a `degeneracy` report loudly on stderr."""
    from pipeline.metrics import degeneracy_warnings

    for line in degeneracy_warnings(model, report):
        typer.secho(f"WARNING: degenerate predictions: {line}", err=True, fg=typer.colors.RED, bold=True)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    run(app)
