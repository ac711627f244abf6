"""LLaVA-Med evaluation metrics: normalization quirks, closed containment, open recall, summaries."""

from __future__ import annotations

import pytest

from pipeline.metrics import closed_correct, normalize_answer, open_recall, score_prediction, summarize


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("YES", "yes"),  # case
        ("Two nodules", "2 nodules"),  # number words
        ("none", "0"),  # VQA's manualMap quirk, kept
        ("The lesion is in a lobe", "lesion is in lobe"),  # articles
        ("an effusion", "effusion"),
        ("Yes, it is!", "yes it is"),  # punctuation
        ("x-ray (chest)", "x ray chest"),
        ("left_lung", "left lung"),  # "_" is punctuation in the VQA list
        ("3.5 cm.", "3.5 cm"),  # decimal point kept, sentence period dropped
        (".5 mm", ".5 mm"),
        ("u.s.", "us"),
        ("1,000 cells", "1000 cells"),  # digit-grouping comma deleted
        ("dont", "don't"),  # contractions restored
        ("isnt it", "isn't it"),
        ("\u2018left\u2019 lung", "left lung"),  # quotes are not apostrophes
        ("  lots   of\tspace \n", "lots of space"),
        ("the", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_punctuation_does_not_depend_on_rest_of_sentence() -> None:
    # The VQA rule deletes "-" everywhere once " -" occurs, turning "x-ray" into "xray" here.
    assert normalize_answer("x-ray - chest") == "x ray chest"


def test_closed_word_level_containment() -> None:
    assert closed_correct("No, there is no effusion.", "no") == 1.0
    assert closed_correct("Yes", "yes") == 1.0
    # LLaVA-Med's substring test would count these: "no" in "nodule", "left" in "cleft".
    assert closed_correct("There is a nodule", "no") == 0.0
    assert closed_correct("cleft palate", "left") == 0.0
    assert closed_correct("Yes, a nodule is present", "no") == 0.0


def test_closed_multiword_and_normalization() -> None:
    assert closed_correct("The answer is the Left Lung.", "left lung") == 1.0
    assert closed_correct("left upper lung", "left lung") == 0.0  # must be a contiguous run
    assert closed_correct("There are two.", "2") == 1.0
    assert closed_correct("CT scan", "CT") == 1.0  # no yes/no gate
    assert closed_correct("anything", "the") == 0.0  # empty ground truth credits nothing...
    assert closed_correct("a", "the") == 1.0  # ...except an empty prediction


def test_open_recall_partial_credit() -> None:
    assert open_recall("left lobe", "left lower lobe") == pytest.approx(2 / 3)
    assert open_recall("The left lower lobe.", "left lower lobe") == 1.0
    assert open_recall("right", "left lower lobe") == 0.0
    assert open_recall("There are three lesions", "3") == 1.0


def test_open_recall_clips_repeats() -> None:
    # LLaVA-Med would give 3 / (3 + 1) = 0.75 here.
    assert open_recall("left left left", "left lobe") == 0.5
    assert open_recall("left", "left left") == 0.5


def test_score_prediction_dispatch() -> None:
    assert score_prediction("nodule", "no", "CLOSED") == 0.0
    assert score_prediction("left lobe", "left lower lobe", "open") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="answer_type"):
        score_prediction("x", "y", "other")


def test_summarize_known_values() -> None:
    rows = [
        {"answer_type": "closed", "modality": "ct", "question_type": "presence", "score": 1.0},
        {"answer_type": "closed", "modality": "ct", "question_type": "presence", "score": 0.0},
        {"answer_type": "CLOSED", "modality": "xray", "question_type": "position", "score": 1.0},
        {"answer_type": "open", "modality": "ct", "question_type": "position", "score": 0.5},
        {"answer_type": "open", "modality": "mri", "question_type": "organ", "score": 0.25},
    ]
    out = summarize(rows)
    assert out["closed_accuracy"] == pytest.approx(2 / 3)
    assert out["open_recall"] == pytest.approx(0.375)
    assert (out["n_closed"], out["n_open"]) == (3, 2)
    assert out["by_modality"] == {
        "ct": {"closed_accuracy": 0.5, "open_recall": 0.5, "n_closed": 2, "n_open": 1},
        "mri": {"closed_accuracy": None, "open_recall": 0.25, "n_closed": 0, "n_open": 1},
        "xray": {"closed_accuracy": 1.0, "open_recall": None, "n_closed": 1, "n_open": 0},
    }
    assert out["by_question_type"] == {
        "organ": {"closed_accuracy": None, "open_recall": 0.25, "n_closed": 0, "n_open": 1},
        "position": {"closed_accuracy": 1.0, "open_recall": 0.5, "n_closed": 1, "n_open": 1},
        "presence": {"closed_accuracy": 0.5, "open_recall": None, "n_closed": 2, "n_open": 0},
    }


def test_summarize_empty() -> None:
    out = summarize([])
    assert out == {
        "closed_accuracy": None,
        "open_recall": None,
        "n_closed": 0,
        "n_open": 0,
        "by_modality": {},
        "by_question_type": {},
    }
