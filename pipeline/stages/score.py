"""`score` stage: clinical-relevance consensus scores and DPO weights for every dispreferred
response (MMedPO §3.2-3.3). The panel, protocol and weights are the `score:` section of the
params file (docs/judges.md). Every judge answer is kept in `--cache` the moment it arrives, so an
interrupted run asks only what is missing. A run that fails once judging is under way (a judge
error, Ctrl-C, more unscored responses than `score.max_unscored`) still writes `--metrics` (with
`status` and `failure`) and `--timings`. With `score.rationales.enabled`, one judge of the panel
then writes CheXPO rationales and counterfactual rationales (columns `rationale`,
`counterfactuals`; docs/judges.md)."""

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
    params: Path = params_option("score"),
    input: Path = input_option("ranked preferences (Parquet, from `rerank`)"),
    output: Path = output_option("ranked preferences plus judgements (Parquet)"),
    metrics: Path = metrics_option(),
    cache: Path = output_option("the judge response cache (SQLite; resume); not a DVC output", "--cache"),
    model_root: Path = input_option("folder that holds local judge models (a dep of this stage)", "--model-root"),
    timings: Path = timings_option(),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    from pipeline.judges.backends.hf import PACKAGED
    from pipeline.judges.panel import ScoreConfig
    from pipeline.judges.scoring import score_panel
    from pipeline.models.sources import check_model_source
    from pipeline.params import load_config
    from pipeline.reporting import write_json
    from pipeline.schema import RANKED_SCHEMA, SCORED_SCHEMA, read_rows, require_rows, write_rows

    config = load_config(ScoreConfig, params, "score")
    for i, judge in enumerate(config.judges):
        if judge.backend == "hf":
            check_model_source(judge.model, f"score.judges[{i}].model", model_root, packaged=[PACKAGED])
    rows = require_rows(read_rows(input, RANKED_SCHEMA), input)

    def write_reports(report: dict, times: dict) -> None:
        # Cache hits depend on what earlier runs left in the cache, and retries on the server, not on
        # the inputs: with the wall-clock values in the uncached run report, so that
        # reports/score.json is the same on a fresh clone.
        report = dict(report)
        write_json(timings, {**times, "cache": report.pop("cache", None),
                             "request_retries": report.pop("request_retries", None)})
        write_json(metrics, report)

    scored, report, times = score_panel(config, rows, cache, progress=progress, on_failure=write_reports)
    write_rows(scored, output, SCORED_SCHEMA)
    write_reports(report, times)
    written = report["rationales"]
    rationales = "" if not written["enabled"] else (
        f"; rationales {written['rationale']['written']}/{written['rationale']['requested']}, counterfactuals "
        f"{written['counterfactual']['written']}/{written['counterfactual']['requested']} written "
        f"(failed: {', '.join(f'{k} {v}' for k, v in written['failed_by_cause'].items())}), cache hits "
        f"{times['rationale_cache']['hits']}, asked {times['rationale_cache']['asked']} in "
        f"{times['rationale_seconds']} s"
    )
    typer.echo(
        f"score: {report['responses']} responses of {report['entries']} entries, "
        f"agreement {report['agreement_rate'] if report['agreement_rate'] is not None else 'n/a'}, "
        f"{report['missing']['unscored_responses']} unscored, cache hits {report['cache']['hits']}, "
        f"asked {report['cache']['asked']} in {times['seconds']} s{rationales} -> {output}"
    )


if __name__ == "__main__":
    run(app)
