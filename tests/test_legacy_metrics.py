"""LLaVA-Med's run_eval.py, quirks included (`pipeline.legacy_metrics`): every expected number
below was worked out by hand from that code's logic (llava/eval/run_eval.py and eval_metrics/ at
microsoft/LLaVA-Med ad758b6), and set beside what our strict metrics give for the same answers."""

from __future__ import annotations

import pytest

from pipeline.legacy_metrics import (
    calculate_appearance_with_normalization,
    calculate_f1score,
    candidate_answers,
    legacy_reports,
    legacy_summary,
    normalize_word,
)
from pipeline.metrics import score_prediction, summarize

ROWS = [
    # closed: (answer, prediction)
    {"answer": "no", "prediction": "No", "answer_type": "closed"},  # right: hit 1
    {"answer": "yes", "prediction": "no", "answer_type": "closed"},  # wrong, says "no": left out entirely
    {"answer": "no", "prediction": "nodule", "answer_type": "closed"},  # "no" inside "nodule": hit 1
    {"answer": "yes", "prediction": "left", "answer_type": "closed"},  # no yes/no in it: 0
    {"answer": "left", "prediction": "left", "answer_type": "closed"},  # right, but no yes/no: 0
    # open
    {"answer": "left lung", "prediction": "the left left", "answer_type": "open"},
    {"answer": "2", "prediction": "two", "answer_type": "open"},
]


def _strict_rows():
    return [{**r, "modality": "ct", "question_type": "presence", "id": str(i), "model": "m", "question": "q",
             "score": score_prediction(r["prediction"], r["answer"], r["answer_type"])} for i, r in enumerate(ROWS)]


def test_normalization_reproduces_the_vqa_normalizer_with_its_quirks():
    assert normalize_word("x-ray of the chest.") == "x ray of chest"  # "-" touches no space: a space
    assert normalize_word("x - ray, left") == "x ray left"  # "-" touches a space: deleted everywhere
    assert normalize_word("1,000 cells, (left)") == "1000 cells left"  # a digit-grouping comma: all deleted
    assert normalize_word("." * 33 + "x") == ".x"  # re.UNICODE is the count: only 32 periods go
    assert normalize_word("somebody'd dont know none") == "somebodyd don't know 0"
    assert normalize_word("3.5 cm.") == "3.5 cm"


def test_closed_accuracy_drops_wrong_yes_no_answers_from_the_denominator():
    legacy = legacy_summary(ROWS, candidate_answers(ROWS))
    assert legacy["n_closed"] == 5 and legacy["closed_counted"] == 4  # row 2 is not counted
    assert legacy["closed_accuracy"] == pytest.approx(2 / 4)  # rows 1 and 3 of rows 1, 3, 4, 5
    strict = summarize(_strict_rows())
    assert strict["closed_accuracy"] == pytest.approx(2 / 5)  # rows 1 and 5: word-level, no gate
    always_yes = [{"answer": a, "prediction": "yes", "answer_type": "closed"} for a in ("yes", "no", "no", "no")]
    assert legacy_summary(always_yes, ["yes", "no"])["closed_accuracy"] == 1.0  # 1 right, 3 wrong: 100%


def test_open_recall_counts_repeated_prediction_words():
    f1, precision, recall = calculate_f1score("left left", "left lung")
    assert (precision, recall) == (1.0, 2 / 3)  # tp = 2 (the prediction's count of "left"), fn = 1
    assert f1 == pytest.approx(0.8)
    assert calculate_f1score("", "left") == (0.0, 0.0, 0.0)
    assert calculate_f1score("left left left", "left")[2] == 1.0
    legacy = legacy_summary(ROWS, candidate_answers(ROWS))
    assert legacy["n_open"] == 2
    assert legacy["open_recall"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert legacy["open_exact_match"] == pytest.approx((1 / 2 + 1.0) / 2)  # 1 distinct gt word / 2 pred words
    assert summarize(_strict_rows())["open_recall"] == pytest.approx((1 / 2 + 1.0) / 2)


def test_open_accuracy_maps_the_prediction_to_the_closest_candidate():
    candidates = candidate_answers(ROWS)
    assert candidates == ["no", "yes", "left", "left lung", "2"]
    # "left left": "left" shares 1/1 of its words, "left lung" 1/2: mapped to "left", not the answer
    assert calculate_appearance_with_normalization("left left", "left lung", candidates) == 0.0
    assert calculate_appearance_with_normalization("left lung", "left lung", candidates) == 0.0  # ties: first wins
    assert calculate_appearance_with_normalization("2", "2", candidates) == 1.0
    assert legacy_summary(ROWS, candidates)["open_accuracy"] == pytest.approx(1 / 2)


def test_every_model_is_scored_against_one_candidate_list():
    reports = legacy_reports({"sft": ROWS, "sft_blind": ROWS[:5]})
    assert reports["sft"]["closed_accuracy"] == pytest.approx(0.5)
    assert reports["sft_blind"]["open_recall"] is None and reports["sft_blind"]["n_open"] == 0
    assert legacy_summary([], ["x"])["closed_accuracy"] is None
