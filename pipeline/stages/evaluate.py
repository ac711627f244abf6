"""`evaluate` stage: every model and its blind control on the test split -> reports/metrics.json."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.params import load_params, section
from pipeline.reporting import write_json
from pipeline.schema import PREDICTION_SCHEMA, VQA_SCHEMA, read_rows, write_rows

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    test: Path = typer.Option(Path("data/prepared/test.parquet")),
    model: list[str] = typer.Option(["sft=models/sft"], help="NAME=FOLDER, repeatable"),
    metrics: Path = typer.Option(Path("reports/metrics.json")),
    predictions_dir: Path = typer.Option(Path("reports/predictions")),
    preferences: Path = typer.Option(Path("data/scored.parquet"),
                                     help="preference entries for the log-prob gap analysis (HSCR Fig. 4)"),
    plots_dir: Path = typer.Option(Path("reports/plots/logprob_gap")),
) -> None:
    import csv

    from pipeline.evaluation import deltas, evaluate_model, gap_histograms, gap_summary, logprob_gaps
    from pipeline.models.profiles import load_vlm
    from pipeline.schema import RANKED_SCHEMA

    cfg = section(load_params(params), "evaluate")
    rows = read_rows(test, VQA_SCHEMA)
    if cfg.get("max_rows"):
        rows = rows[: int(cfg["max_rows"])]
    report: dict = {}
    pref_rows = read_rows(preferences, RANKED_SCHEMA) if preferences.exists() else []
    pref_rows = [r for r in pref_rows if r["rejected"]]
    gaps: dict[str, list[float]] = {}
    names = []
    for spec in model:
        name, _, folder = spec.partition("=")
        if not folder:
            raise typer.BadParameter(f"--model takes NAME=FOLDER, got {spec!r}")
        vlm = load_vlm(folder)
        results, predictions = evaluate_model(
            vlm, name, rows, batch_size=int(cfg["batch_size"]), max_new_tokens=int(cfg["max_new_tokens"])
        )
        report.update(results)
        names.append(name)
        if pref_rows:
            gaps[name] = logprob_gaps(vlm, pref_rows, int(cfg["batch_size"]))
            report[f"{name}_logprob_gap"] = gap_summary(gaps[name], [r["modality"] for r in pref_rows])
        for key, pred_rows in predictions.items():
            write_rows(pred_rows, predictions_dir / f"{key}.parquet", PREDICTION_SCHEMA)
        head = results[name]
        blind = results[f"{name}_blind"]
        typer.echo(
            f"evaluate {name}: closed {_pct(head['closed_accuracy'])} (blind {_pct(blind['closed_accuracy'])}), "
            f"open {_pct(head['open_recall'])} (blind {_pct(blind['open_recall'])})"
        )
    for name in names[1:]:
        report[f"{name}_minus_{names[0]}"] = deltas(report, name, names[0])
    if gaps:
        plots_dir.mkdir(parents=True, exist_ok=True)
        for modality, table in gap_histograms(gaps, [r["modality"] for r in pref_rows]).items():
            with (plots_dir / f"{modality}.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(table[0]))
                writer.writeheader()
                writer.writerows(table)
    write_json(metrics, report)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    app()
