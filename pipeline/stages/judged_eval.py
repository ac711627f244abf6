"""`judged_eval` stage: an LLM judge scores each model's free-text answers against the references on
LLaVA-Med's relative-score protocol (HSCR Table 2; docs/evaluation.md § "LLM-judged evaluation").

Reads `<predictions>/<model>.parquet` of every `--model` (the same items for each), and, when
`judged_eval.answer_types` names `report`, `<report-predictions>/<model>.parquet` (the generated
reports of the report-generation benchmarks); writes the
scores per model, answer type and modality to `--metrics` and one JSON line per model and item, with
the messages sent and every raw reply, to `--transcripts`. Every reply is kept in `--cache` the
moment it arrives (resume; a rerun asks nothing twice). With `judged_eval.enabled: false` it writes
`{"enabled": false}` and an empty transcripts file, and loads nothing.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import DataError, ParamsError
from pipeline.judged_evaluation import (
    REPORT_ANSWER_TYPE,
    JudgedEvalConfig,
    disabled_metrics,
    evaluate_models,
    load_judged_eval_prompts,
    report_rows,
)
from pipeline.params import load_config
from pipeline.reporting import write_json, write_jsonl
from pipeline.schema import PREDICTION_SCHEMA, REPORT_PREDICTION_SCHEMA, VQA_SCHEMA, read_rows, require_rows
from pipeline.stages._cli import input_option, metrics_option, output_option, params_option, run, stage_app

app = stage_app(__doc__)


@app.command(help=__doc__)
def main(
    params: Path = params_option("judged_eval"),
    predictions: Path = input_option("folder of <model>.parquet predictions (the evaluate stage's)", "--predictions"),
    report_predictions: Path = input_option("folder of <model>.parquet generated reports (the evaluate stage's "
                                            "--report-output); read when answer_types names `report`",
                                            "--report-predictions"),
    test: Path = input_option("the test split the predictions answer (its entries' earlier turns)", "--test"),
    model: list[str] = typer.Option(..., "--model", help="a model whose predictions are judged (repeat; the "
                                    "first one's items are sampled)"),
    model_root: Path = input_option("folder that holds local judge models (a dep of this stage)", "--model-root"),
    cache: Path = output_option("the judge response cache (SQLite; resume); not a DVC output", "--cache"),
    metrics: Path = metrics_option(),
    transcripts: Path = output_option("one JSON line per model and item: scores, messages, raw replies",
                                      "--transcripts"),
) -> None:
    config = load_config(JudgedEvalConfig, params, "judged_eval")
    if not config.enabled:
        write_json(metrics, disabled_metrics())
        write_jsonl(transcripts, [], sort_keys=True)
        typer.echo("judged_eval: off (judged_eval.enabled: false)")
        return
    from pipeline.judges.backends.hf import PACKAGED
    from pipeline.judges.cache import ResponseCache
    from pipeline.judges.judge import build_judges
    from pipeline.models.sources import check_model_source

    if config.judge.backend == "hf":
        check_model_source(config.judge.model, "judged_eval.judge.model", model_root, packaged=[PACKAGED])
    prompts = load_judged_eval_prompts(config.prompts)
    if config.judge.role not in prompts.roles:
        raise ParamsError(f"judged_eval.judge.role {config.judge.role!r} is not a role of {config.prompts} "
                                 f"(roles: {sorted(prompts.roles)})")
    rows = {name: require_rows(read_rows(predictions / f"{name}.parquet", PREDICTION_SCHEMA),
                               predictions / f"{name}.parquet") for name in model}
    if REPORT_ANSWER_TYPE in config.answer_types:
        for name in model:
            reports = report_rows(read_rows(report_predictions / f"{name}.parquet", REPORT_PREDICTION_SCHEMA))
            clash = sorted({row["id"] for row in reports} & {row["id"] for row in rows[name]})
            if clash:
                raise DataError(f"judged_eval: {len(clash)} id(s) of model {name!r} are both a test entry and a "
                                f"report case, e.g. {clash[:3]}; give the report benchmark other ids")
            rows[name] = [*rows[name], *reports]
    contexts = {row["id"]: row["context"] for row in read_rows(test, VQA_SCHEMA) if row["context"]}
    with ResponseCache(cache) as store:
        (judge,) = build_judges([config.judge], store, {"judged_eval": prompts.version}, config.request_retry)
        result, lines = evaluate_models(judge, prompts, config, rows, contexts)
    write_json(metrics, result)
    write_jsonl(transcripts, lines, sort_keys=True)
    scores = ", ".join(f"{name} {summary['overall']['relative_score']}" for name, summary in result["models"].items())
    typer.echo(f"judged_eval: {result['items']} items per model, relative score {scores} -> {metrics}")


if __name__ == "__main__":
    run(app)
