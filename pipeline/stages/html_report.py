"""`html_report` stage: the run as one self-contained, offline HTML page, `reports/html/index.html`.

It reads what the run made (the metrics report, the per-question predictions, the candidates
and scored preference entries, the two models, the dvclive training curves and the log-prob gap
histograms) and writes one page with no network reference: images as data URIs, charts as SVG
rendered here (`pipeline.html_report`; docs/report.md). The models answer the sampled preference
entries (with and without the image) as `evaluate` does; a missing training-curve or gap folder
gives a note on the page, not a failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.stages._cli import input_option, output_option, params_option, run, stage_app

app = stage_app(__doc__)


@app.command(help=__doc__)
def main(
    params: Path = params_option("html_report"),
    metrics: Path = input_option("the run's metrics report (the `report` stage's reports/metrics.json)", "--metrics"),
    predictions: Path = input_option("folder of the per-question predictions of `evaluate` (<model>.parquet)",
                                     "--predictions"),
    candidate_file: Path = input_option("candidates of `sample`, for the replaced tokens of each dispreferred answer",
                                    "--candidates"),
    preferences: Path = input_option("scored preference entries (`score`), sampled for the page's browser",
                                     "--preferences"),
    model: list[str] = typer.Option(..., "--model", help="NAME=FOLDER of a model that answers the sampled entries; "
                                    "repeatable"),
    live: Path = typer.Option(..., "--live", help="folder of the dvclive runs (sft/, train/); a missing run is a "
                              "note on the page"),
    gaps: Path = typer.Option(..., "--gaps", help="folder of the log-prob gap histograms (<modality>.csv) of "
                              "`report`; missing: a note on the page"),
    output: Path = output_option("folder of the page (index.html)"),
) -> None:
    from pipeline.errors import DataError
    from pipeline.evaluation import prediction_models
    from pipeline.html_report import (
        TRAINING_RUNS,
        HtmlReportConfig,
        build_page,
        gap_plots,
        model_answers,
        sample_entries,
        training_plots,
    )
    from pipeline.models.profiles import load_vlm
    from pipeline.params import load_config
    from pipeline.reporting import write_folder
    from pipeline.schema import CANDIDATES_SCHEMA, PREDICTION_SCHEMA, SCORED_SCHEMA, read_rows, require_rows
    from pipeline.stages.evaluate import model_specs

    config = load_config(HtmlReportConfig, params, "html_report")
    models = model_specs(model)
    try:
        report = json.loads(metrics.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{metrics}: not valid JSON ({e}); is it the `report` stage's metrics report?") from e
    keys = prediction_models(report) if isinstance(report, dict) else []
    if not keys:
        raise DataError(f"{metrics}: no model entries (with n_closed / n_open); is it the `report` stage's "
                        "metrics report?")
    tables = {key: read_rows(predictions / f"{key}.parquet", PREDICTION_SCHEMA) for key in keys}
    scored = require_rows(read_rows(preferences, SCORED_SCHEMA), preferences)
    candidate_rows = read_rows(candidate_file, CANDIDATES_SCHEMA)
    plots = [*(training_plots(name, live / name) for name in TRAINING_RUNS), gap_plots(gaps)]
    entries = sample_entries(scored, config.entries, config.seed)
    answers = model_answers(load_vlm, models, entries, config.answer_batch_size, config.answer_max_new_tokens)
    sources = {"metrics": metrics, "predictions": predictions, "candidates": candidate_file, "preferences": preferences,
               **{f"model {name}": folder for name, folder in models}, "training curves": live, "log-prob gaps": gaps}
    page = build_page(config=config, metrics=report, tables=tables, plots=plots, entries=entries,
                      total_entries=len(scored), candidates=candidate_rows, answers=answers,
                      sources={k: str(v) for k, v in sources.items()})
    write_folder(output, lambda folder: (folder / "index.html").write_text(page, encoding="utf-8"))
    size = len(page.encode("utf-8"))
    typer.echo(f"html_report: {output / 'index.html'} ({size / 1e6:.1f} MB; {len(entries)} entries, "
               f"{sum(len(p.plots) for p in plots)} charts); open it in a browser, no server needed")


if __name__ == "__main__":
    run(app)
