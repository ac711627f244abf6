"""`evaluate` stage: every model and its blind control on the test split, plus the HSCR Fig. 4
log-prob gaps on the preference entries."""

from __future__ import annotations

import csv
from pathlib import Path

import typer

from pipeline.stages._cli import input_option, metrics_option, output_option, params_option, run, stage_app

app = stage_app(__doc__)


@app.command(help=__doc__)
def main(
    params: Path = params_option("evaluate"),
    input: Path = input_option("test split (Parquet)"),
    model: list[str] = typer.Option(..., "--model", help="NAME=FOLDER of a model to evaluate; repeatable, the "
                                    "first is the baseline of the `<name>_minus_<first>` deltas"),
    preferences: Path = input_option("scored preference entries, for the log-prob gaps (HSCR Fig. 4)",
                                     "--preferences"),
    output: Path = output_option("folder of per-question predictions, one Parquet file per model"),
    plots: Path = output_option("folder of the log-prob gap histograms, one CSV per modality", "--plots"),
    metrics: Path = metrics_option(),
) -> None:
    from pipeline.evaluation import EvaluateConfig, evaluate_models
    from pipeline.models.profiles import check_model_folder, load_vlm
    from pipeline.params import load_config
    from pipeline.reporting import write_json
    from pipeline.schema import (
        PREDICTION_SCHEMA,
        SCORED_SCHEMA,
        VQA_SCHEMA,
        read_rows,
        require_rows,
        write_rows,
    )

    config = load_config(EvaluateConfig, params, "evaluate")
    models = []
    for spec in model:
        name, _, folder = spec.partition("=")
        if not name or not folder:
            raise typer.BadParameter(f"--model takes NAME=FOLDER, got {spec!r}")
        check_model_folder(Path(folder))  # every folder, before the first model loads
        models.append((name, folder))
    rows = require_rows(read_rows(input, VQA_SCHEMA), input)
    pref_rows = read_rows(preferences, SCORED_SCHEMA)

    def progress(name: str, results: dict) -> None:
        head, blind = results[name], results[f"{name}_blind"]
        typer.echo(
            f"evaluate {name}: closed {_pct(head['closed_accuracy'])} (blind {_pct(blind['closed_accuracy'])}), "
            f"open {_pct(head['open_recall'])} (blind {_pct(blind['open_recall'])})"
        )

    report, predictions, histograms = evaluate_models(load_vlm, models, rows, pref_rows, config, on_model=progress)
    for key, pred_rows in predictions.items():
        write_rows(pred_rows, output / f"{key}.parquet", PREDICTION_SCHEMA)
    plots.mkdir(parents=True, exist_ok=True)
    for modality, table in histograms.items():
        with (plots / f"{modality}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    write_json(metrics, report)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    run(app)
