"""`score` stage: clinical-relevance consensus scores and DPO weights for every dispreferred response.

    python -m pipeline.stages.score [--params params.yaml] [--input data/ranked.parquet]
        [--output data/scored.parquet] [--metrics reports/score.json]

The panel, protocol and weights are configured in the `score:` section of params.yaml; see
docs/judges.md.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.judges.panel import parse_score_config
from pipeline.judges.scoring import score_file
from pipeline.params import load_params, section

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    input: Path = typer.Option(Path("data/ranked.parquet"), help="ranked preferences (rerank stage)"),
    output: Path = typer.Option(Path("data/scored.parquet"), help="ranked preferences plus judgements"),
    metrics: Path = typer.Option(Path("reports/score.json"), help="stage report"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    config = parse_score_config(section(load_params(params), "score"))
    report = score_file(config, input, output, metrics, progress=progress)
    typer.echo(
        f"score: {report['responses']} responses of {report['entries']} entries, "
        f"agreement {report['agreement_rate'] if report['agreement_rate'] is not None else 'n/a'}, "
        f"{report['missing']['unscored_responses']} unscored, cache hits {report['cache']['hits']}, "
        f"asked {report['cache']['asked']} -> {output}"
    )


if __name__ == "__main__":
    app()
