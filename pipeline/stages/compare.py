"""Compare evaluation runs over seeds against a baseline: mean ± std over seeds, 95% bootstrap
intervals over test items, paired tests (exact McNemar for closed accuracy, paired permutation
otherwise), written as JSON and as a Markdown table (also printed).

A run is `--run NAME:SEED=SOURCE`, repeatable: SOURCE is a folder of prediction tables (the
`evaluate` stage's `reports/predictions`) or `rev:<git revision or DVC experiment name>`, read
through DVC. Not a DVC stage: it reads runs from other revisions and experiments.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.stages._cli import output_option, run, stage_app

app = stage_app(__doc__)


@app.command(help=__doc__)
def main(
    runs: list[str] = typer.Option(..., "--run", help="NAME:SEED=SOURCE, repeatable: a config name, the seed it "
                                   "was trained with, and a predictions folder or rev:<git rev or experiment>"),
    baseline: str = typer.Option(..., "--baseline", help="CONFIG/MODEL every row is compared with, e.g. "
                                 "default/sft (blind controls: with the baseline model's blind control)"),
    output: Path = output_option("comparison report (JSON)"),
    markdown: Path = output_option("comparison table (Markdown)", "--markdown"),
    resamples: int = typer.Option(9999, "--resamples", min=1, help="bootstrap resamples and random "
                                  "permutations (a permutation test with 2^n <= this is exact)"),
    resample_seed: int = typer.Option(..., "--seed", help="seed of every bootstrap and permutation (the same "
                                      "runs and seed give the same report)"),
    repo: str | None = typer.Option(None, "--repo", help="DVC project for rev: sources (default: the current one)"),
    predictions_path: str = typer.Option("reports/predictions", "--predictions-path",
                                         help="folder of the prediction tables in a rev: source"),
    metrics_path: str = typer.Option("reports/metrics.json", "--metrics-path",
                                     help="the evaluate metrics report in a rev: source (lists its models)"),
) -> None:
    # `resample_seed`, not `seed`: no stage argument is named like a params.yaml key (test_params).
    from pipeline.compare import compare_runs, load_run, render_markdown
    from pipeline.reporting import write_json

    loaded = [load_run(spec, predictions_path, metrics_path, repo) for spec in runs]
    report = compare_runs(loaded, baseline, seed=resample_seed, resamples=resamples)
    text = render_markdown(report)
    write_json(output, report)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    tmp = markdown.with_name(markdown.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(markdown)
    typer.echo(text, nl=False)


if __name__ == "__main__":
    run(app)
