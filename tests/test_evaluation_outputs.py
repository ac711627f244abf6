"""What `evaluate` writes beyond its scores: per-answer-type decoding caps, the degenerate-prediction
check, and the predictions in lmms-eval's `--log_samples` JSONL layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import pipeline.evaluation as evaluation
from pipeline.data.phantoms import generate_split
from pipeline.errors import DataError, ParamsError
from pipeline.evaluation import EvaluateConfig, MaxNewTokens, evaluate_models, lmms_eval_samples
from pipeline.metrics import degeneracy, degeneracy_warnings
from pipeline.models.profiles import build_tiny
from pipeline.params import build_config, load_params, project_config, project_params_path
from pipeline.schema import (
    ANSWER_TYPES,
    PREDICTION_SCHEMA,
    REPORT_PREDICTION_SCHEMA,
    REPORT_SCHEMA,
    VQA_SCHEMA,
    read_rows,
    write_rows,
)
from tests.conftest import stage_commands

MODELS = [("sft", "models/sft")]


@pytest.fixture(scope="module")
def mixed() -> list[dict]:
    """12 closed + 12 open phantom questions, interleaved (c o o o c c c o o c ...)."""
    return generate_split(24, "test", seed=0, prior=None, image_size=16)


@pytest.fixture(scope="module")
def mixed_vlm(mixed):
    torch.manual_seed(0)
    return build_tiny([r["question"] for r in mixed] + ["yes", "no", "left", "right", "1", "2", "3"], seed=0)


def config(closed: int, open_: int, batch_size: int = 3) -> EvaluateConfig:
    return project_config(EvaluateConfig, "evaluate", batch_size=batch_size, max_rows=None,
                          max_new_tokens={"closed": closed, "open": open_})


# ----- decoding caps per answer type ----------------------------------------------------------------


def test_every_answer_type_has_a_cap_and_an_unknown_key_is_an_error():
    assert set(MaxNewTokens.model_fields) == set(ANSWER_TYPES)
    assert MaxNewTokens(closed=2, open=9).for_type(" OPEN ") == 9
    with pytest.raises(DataError, match="answer_type must be one of"):
        MaxNewTokens(closed=2, open=9).for_type("choice")
    params = load_params(project_params_path())["evaluate"]
    with pytest.raises(ParamsError, match=r"unknown key `evaluate.max_new_tokens.opne`; did you mean "
                                          r"`evaluate.max_new_tokens.open`\?"):
        build_config(EvaluateConfig, {**params, "max_new_tokens": {"closed": 5, "opne": 16}}, where="evaluate")
    with pytest.raises(ParamsError, match=r"`evaluate.max_new_tokens.open` is missing"):
        build_config(EvaluateConfig, {**params, "max_new_tokens": {"closed": 5}}, where="evaluate")
    with pytest.raises(ParamsError, match=r"`evaluate.max_new_tokens.closed` must be greater than or equal to 1"):
        build_config(EvaluateConfig, {**params, "max_new_tokens": {"closed": 0, "open": 16}}, where="evaluate")


def test_batches_hold_one_answer_type_and_cover_every_row_once(mixed):
    batches = evaluation.type_batches(mixed, 5)
    assert sorted(i for b in batches for i in b) == list(range(len(mixed)))
    kinds = [{mixed[i]["answer_type"] for i in b} for b in batches]
    assert all(len(k) == 1 for k in kinds)
    assert [k.pop() for k in kinds] == ["closed"] * 3 + ["open"] * 3  # 12 of each, 5 at a time
    assert all(b == sorted(b) for b in batches)  # input order inside a type
    with pytest.raises(DataError, match="row 'x': answer_type must be one of"):
        evaluation.type_batches([{"id": "x", "answer_type": "multiple-choice"}], 5)
    # outputs in batch order go back to input order
    assert evaluation.in_input_order([[2, 0], [1]], ["c", "a", "b"]) == ["a", "b", "c"]
    with pytest.raises(DataError, match="not one output per row"):
        evaluation.in_input_order([[1, 0]], ["a"])


def test_each_batch_decodes_with_its_types_cap_and_rows_keep_their_order(tmp_path, monkeypatch, mixed, mixed_vlm):
    """The real decoder on the tiny model: closed rows get at most 1 token, open rows up to 6 (and
    some use more than 1); the prediction rows come back in the input's order."""
    decoded: list[tuple[int, list[list[int]]]] = []
    real = evaluation.greedy_generate

    def spy(vlm, batch, max_new_tokens, attention_mask=None):
        tokens = real(vlm, batch, max_new_tokens, attention_mask=attention_mask)
        decoded.append((max_new_tokens, tokens))
        return tokens

    monkeypatch.setattr(evaluation, "greedy_generate", spy)
    cfg = config(closed=1, open_=6, batch_size=5)
    done = evaluate_models(lambda folder: mixed_vlm, MODELS, mixed, cfg, tmp_path / "work",
                           {"input": "x", "models": {"sft": "a"}})

    batches = evaluation.type_batches(mixed, 5)
    assert [cap for cap, _ in decoded] == [1, 1, 1, 6, 6, 6] * 2  # predictions, then the blind control
    for (cap, tokens), indices in zip(decoded, batches * 2, strict=True):
        assert len(tokens) == len(indices) and all(len(t) <= cap for t in tokens)
    open_lengths = [len(t) for cap, tokens in decoded if cap == 6 for t in tokens]
    assert max(open_lengths) > 1  # the open cap is really used: a closed row could never get this many
    for key in ("sft", "sft_blind"):
        rows = done.predictions[key]
        assert [r["id"] for r in rows] == [r["id"] for r in mixed]
        assert [r["answer_type"] for r in rows] == [r["answer_type"] for r in mixed]
        assert done.report[key]["max_new_tokens"] == {"closed": 1, "open": 6}
    # each prediction is the decoding of its own row: the same as answering that row alone
    first_open = next(i for i, r in enumerate(mixed) if r["answer_type"] == "open")
    alone = evaluation.predict_batch(mixed_vlm, [mixed[first_open]], 6)
    assert done.predictions["sft"][first_open]["prediction"] == alone[0]
    assert evaluation.predict(mixed_vlm, mixed, 5, cfg.max_new_tokens) == [r["prediction"]
                                                                          for r in done.predictions["sft"]]


def test_a_run_interrupted_on_mixed_types_resumes_to_the_same_rows(tmp_path, monkeypatch, mixed, mixed_vlm):
    cfg = config(closed=2, open_=4, batch_size=5)
    inputs = {"input": "x", "models": {"sft": "a"}}
    clean = evaluate_models(lambda folder: mixed_vlm, MODELS, mixed, cfg, tmp_path / "clean", inputs)

    class Interrupt(Exception):
        pass

    calls: list[int] = []
    real = evaluation.predict_batch

    def flaky(vlm, rows, max_new_tokens, blind=False):
        if len(calls) == 4:  # 3 closed batches and the first open one are on disk
            raise Interrupt
        calls.append(max_new_tokens)
        return real(vlm, rows, max_new_tokens, blind)

    monkeypatch.setattr(evaluation, "predict_batch", flaky)
    with pytest.raises(Interrupt):
        evaluate_models(lambda folder: mixed_vlm, MODELS, mixed, cfg, tmp_path / "work", inputs)
    assert calls == [2, 2, 2, 4]
    monkeypatch.setattr(evaluation, "predict_batch", real)
    resumed = evaluate_models(lambda folder: mixed_vlm, MODELS, mixed, cfg, tmp_path / "work", inputs)
    assert resumed.work["sft"]["predictions"] == {"batches": 6, "reused": 4, "computed": 2}
    assert resumed.predictions == clean.predictions and resumed.report == clean.report


def test_changing_one_types_cap_gives_new_resume_keys():
    inputs = {"input": "x", "models": {"sft": "a"}}
    keys = evaluation.work_keys(MODELS, config(5, 16), inputs)
    assert evaluation.work_keys(MODELS, config(5, 16), inputs) == keys
    for other in (config(5, 17), config(6, 16)):
        new = evaluation.work_keys(MODELS, other, inputs)
        assert set(new["sft"].values()).isdisjoint(keys["sft"].values())


# ----- degenerate predictions --------------------------------------------------------------------


def rows_of(kind: str, answers: list[str], predictions: list[str]) -> list[dict]:
    return [{"answer_type": kind, "answer": a, "prediction": p} for a, p in zip(answers, predictions, strict=True)]


def test_mostly_empty_predictions_are_flagged():
    # "", spaces and "the." all normalize to nothing: 3 of 4 empty
    report = degeneracy(rows_of("closed", ["yes", "no", "yes", "no"], ["", "  ", "the.", "yes"]))
    closed = report["closed"]
    assert closed["n"] == 4 and closed["empty_share"] == 0.75
    assert closed["mostly_empty"] and closed["flagged"] and not closed["constant"]
    assert closed["top_prediction"] == "yes" and closed["top_share"] == 0.25
    assert report["open"] == {"n": 0, "empty_share": None, "top_prediction": None, "top_share": None,
                              "distinct_answers": 0, "mostly_empty": False, "constant": False, "flagged": False}
    # exactly half empty is not "most"
    assert not degeneracy(rows_of("closed", ["yes", "no"], ["", "no"]))["closed"]["flagged"]
    (line,) = degeneracy_warnings("sft", report)
    assert "sft" in line and "75.0%" in line and "closed" in line and "empty" in line


def test_one_constant_prediction_is_flagged_where_the_answers_differ():
    answers = ["left", "right", "left lobe", "1", "2", "3", "large", "small", "left", "right", "1"]
    predictions = ["Left."] * 10 + ["right"]  # 10/11 = 90.9% one string once normalized
    report = degeneracy(rows_of("open", answers, predictions))["open"]
    assert report["top_prediction"] == "left" and report["top_share"] == pytest.approx(10 / 11)
    assert report["constant"] and report["flagged"] and not report["mostly_empty"]
    assert report["distinct_answers"] == 8
    (line,) = degeneracy_warnings("aligned_blind", {"open": report})
    assert "aligned_blind" in line and "90.9%" in line and "open" in line and "'left'" in line
    # 9 of 10 is exactly 90%: not more than 90%
    assert not degeneracy(rows_of("open", answers[:10], ["left"] * 9 + ["right"]))["open"]["constant"]
    # a constant answer where every reference is that answer is no collapse
    same = degeneracy(rows_of("closed", ["yes"] * 5, ["yes"] * 5))["closed"]
    assert same["top_share"] == 1.0 and same["distinct_answers"] == 1 and not same["flagged"]


def test_healthy_predictions_are_not_flagged_and_ties_break_alphabetically():
    rows = (rows_of("closed", ["yes", "no"] * 4, ["no", "yes", "yes", "no", "yes", "no", "yes", "no"])
            + rows_of("open", ["left", "right", "1", "2"], ["right", "left", "1", "3"]))
    report = degeneracy(rows)
    for kind in ANSWER_TYPES:
        assert not (report[kind]["mostly_empty"] or report[kind]["constant"] or report[kind]["flagged"]), kind
    assert report["closed"]["top_prediction"] == "no" and report["closed"]["top_share"] == 0.5  # 4 "no", 4 "yes"
    assert degeneracy_warnings("sft", report) == []
    with pytest.raises(ValueError, match="answer_type must be one of"):
        degeneracy([{"answer_type": "choice", "answer": "a", "prediction": "a"}])


# ----- lmms-eval --log_samples JSONL ------------------------------------------------------------------


PREDICTIONS = [
    {"id": "q1", "model": "sft", "question": "Is there a lesion?", "answer": "Yes", "prediction": "yes.",
     "answer_type": "closed", "modality": "ct", "question_type": "presence", "score": 1.0},
    {"id": "q2", "model": "sft", "question": "Which lobe?", "answer": "the left lower lobe",
     "prediction": "Left lobe", "answer_type": "OPEN", "modality": "x-ray", "question_type": "position",
     "score": 2 / 3},
]


def test_lmms_eval_lines_have_its_fields_in_its_order():
    lines = lmms_eval_samples(PREDICTIONS)
    assert [list(line) for line in lines] == [["doc_id", "target", "filtered_resps", "token_counts", "doc_hash",
                                              "closed_accuracy", "open_recall", "input"]] * 2
    first, second = lines
    assert (first["doc_id"], second["doc_id"]) == (0, 1)
    assert first["target"] == "Yes" and first["filtered_resps"] == "yes." and first["input"] == "Is there a lesion?"
    assert first["token_counts"] == [None]
    assert first["closed_accuracy"] == first["open_recall"] == {
        "id": "q1", "prediction": "yes.", "prediction_normalized": "yes", "target": "Yes", "target_normalized": "yes",
        "answer_type": "closed", "modality": "ct", "content_type": "presence", "is_correct": True, "score": 1.0}
    record = second["open_recall"]
    assert record["answer_type"] == "open" and record["target_normalized"] == "left lower lobe"
    assert record["prediction_normalized"] == "left lobe" and record["is_correct"] is False
    assert record["score"] == pytest.approx(2 / 3) and record["content_type"] == "position"
    doc = {k: PREDICTIONS[0][k] for k in ("id", "question", "answer", "answer_type", "modality", "question_type")}
    assert first["doc_hash"] == hashlib.sha256(json.dumps(doc, indent=2, ensure_ascii=False).encode()).hexdigest()
    assert second["doc_hash"] != first["doc_hash"]
    # the model's name and its prediction do not change the document's hash
    renamed = lmms_eval_samples([{**PREDICTIONS[0], "model": "aligned", "prediction": "no"}])[0]
    assert renamed["doc_hash"] == first["doc_hash"] and renamed["filtered_resps"] == "no"


# ----- the stage ----------------------------------------------------------------------------------------


def test_the_stage_warns_records_and_writes_the_jsonl(tmp_path, monkeypatch, mixed):
    """A model that answers "yes" to everything (and its blind control, nothing): loud warnings on
    stderr, `degenerate` and `max_new_tokens` in the metrics, one JSONL line per question."""
    from pipeline.stages.evaluate import app

    args = stage_commands()["evaluate@sft"]
    arg = dict(zip(args[::2], args[1::2], strict=True))
    monkeypatch.chdir(tmp_path)
    write_rows(mixed, Path(arg["--input"]), VQA_SCHEMA)
    write_rows([], Path(arg["--reports"]), REPORT_SCHEMA)  # no report benchmark: no reports, no scores
    build_tiny([r["question"] for r in mixed] + ["yes", "no"], seed=0).save(Path(arg["--model"].partition("=")[2]))
    params = load_params(project_params_path())
    params["evaluate"].update(batch_size=8, max_rows=None, max_new_tokens={"closed": 3, "open": 7})
    Path(arg["--params"]).write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setattr(evaluation, "predict_batch",
                        lambda vlm, rows, max_new_tokens, blind=False: ["" if blind else "Yes"] * len(rows))

    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "WARNING: degenerate predictions: sft: 100.0% of its 12 closed predictions are 'yes'" in result.stderr
    assert "WARNING: degenerate predictions: sft_blind: 100.0% of its 12 open predictions are empty" in result.stderr
    metrics = json.loads(Path(arg["--metrics"]).read_text())
    assert metrics["sft"]["degenerate"]["closed"]["constant"] and metrics["sft"]["degenerate"]["open"]["constant"]
    assert not metrics["sft"]["degenerate"]["closed"]["mostly_empty"]
    assert metrics["sft_blind"]["degenerate"]["open"]["mostly_empty"]
    assert metrics["sft_blind"]["degenerate"]["open"]["top_prediction"] is None
    assert metrics["sft"]["max_new_tokens"] == metrics["sft_blind"]["max_new_tokens"] == {"closed": 3, "open": 7}
    for key in ("sft", "sft_blind"):
        table = read_rows(Path(arg["--output"]) / f"{key}.parquet", PREDICTION_SCHEMA)
        lines = [json.loads(line) for line in
                 (Path(arg["--log-samples"]) / f"{key}_samples.jsonl").read_text(encoding="utf-8").splitlines()]
        assert lines == lmms_eval_samples(table)
        assert [line["closed_accuracy"]["id"] for line in lines] == [r["id"] for r in mixed]
        assert read_rows(Path(arg["--report-output"]) / f"{key}.parquet", REPORT_PREDICTION_SCHEMA) == []
        assert f"{key}_report_generation" not in metrics
