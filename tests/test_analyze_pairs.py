"""scripts/analyze_pairs.py on a tiny synthetic workspace: pair categories, false negatives, weights,
the prior's direction, SFT answers, and the CLI end to end (no model: --no-generate)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import analyze_pairs as ap  # noqa: E402

from pipeline.schema import (  # noqa: E402
    CANDIDATES_SCHEMA,
    POOL_SCHEMA,
    PREDICTION_SCHEMA,
    SCORED_SCHEMA,
    VQA_SCHEMA,
    write_rows,
)

Q_PRESENT = "Is there a nodule?"
Q_SIZE = "Is the mass small or large?"
Q_COUNT = "How many nodules?"


def _entry(i: int, question: str, answer: str, kind: str, modality: str = "ct", split: str = "train") -> dict:
    return {"id": f"e{i}", "dataset": "toy", "split": split, "image": b"", "question": question, "answer": answer,
            "answer_type": kind, "modality": modality, "question_type": "q", "context": []}


# Train: "no" is the majority of Q_PRESENT (3 of 4), "small" of Q_SIZE (2 of 3), "1" of Q_COUNT.
TRAIN = [
    _entry(100, Q_PRESENT, "no", "closed"), _entry(101, Q_PRESENT, "No.", "closed"),
    _entry(102, Q_PRESENT, "no", "closed"), _entry(103, Q_PRESENT, "yes", "closed"),
    _entry(104, Q_SIZE, "small", "open"), _entry(105, Q_SIZE, "small", "open"), _entry(106, Q_SIZE, "large", "open"),
    _entry(107, Q_COUNT, "1", "open"), _entry(108, Q_COUNT, "2", "open"),
]

# (entry, chosen, [(dispreferred, judge score, weight)]), dispreferred in rank order.
ENTRIES = [
    (0, Q_PRESENT, "yes", "closed", "ct", [("no", 0.0, 0.8), ("true", 0.0, 0.8), ("1", 1.0, 1.2)]),
    (1, Q_PRESENT, "no", "closed", "ct", [("yes", 0.0, 0.8), ("not", 0.0, 0.8), ("lung", 0.0, 0.8)]),
    (2, Q_SIZE, "large", "open", "mri", [("small", 0.0, 0.8), ("big", 0.0, 0.8), ("larg", 0.0, 0.8)]),
    (3, Q_COUNT, "2", "open", "mri", [("1", 2.0, 1.25), ("7", 2.0, 1.25), ("yes", 2.0, 1.25)]),
]


def _scored_rows() -> list[dict]:
    rows = []
    for i, q, a, kind, modality, rejected in ENTRIES:
        row = _entry(i, q, a, kind, modality)
        row["rejected"] = [{"text": t, "similarity": 0.9 - 0.1 * r, "level": r + 1, "logprob": -1.0 - r}
                           for r, (t, _, _) in enumerate(rejected)]
        row["judgements"] = [{"score": s, "rounds": 1, "agreed": True, "weight": w, "transcript": "[]"}
                             for _, s, w in rejected]
        row.update(rationale=None, counterfactuals=None, visual_dispreferred=None)
        rows.append(row)
    return rows


def _pairs(keep: int | None = None) -> list[dict]:
    return ap.annotate_pairs(ap.explode_pairs(_scored_rows(), keep), ap.answer_sets(TRAIN))


def test_classify_pair_covers_each_category():
    same_q = {"yes", "no"}
    everything = {"yes", "no", "small", "large", "1", "2"}
    assert ap.classify_pair("No", "no.", "closed", same_q, everything) == "identical"
    assert ap.classify_pair("no", "false", "closed", same_q, everything) == "same_yes_no"
    assert ap.classify_pair("large", "big", "open", {"small", "large"}, everything) == "synonym"
    assert ap.classify_pair("large", "larg", "open", {"small", "large"}, everything) == "truncation"
    assert ap.classify_pair("yes", "no", "closed", same_q, everything) == "other_answer_same_question"
    assert ap.classify_pair("yes", "not", "closed", same_q, everything) == "other_answer_other_word"
    assert ap.classify_pair("small", "big", "open", {"small", "large"}, everything) == "other_answer_other_word"
    assert ap.classify_pair("yes", "1", "closed", same_q, everything) == "answer_to_other_question"
    assert ap.classify_pair("2", "7", "open", {"1", "2"}, everything) == "off_vocabulary"


def test_explode_keeps_the_top_j_and_counts_by_type():
    assert len(_pairs()) == 12
    pairs = _pairs(keep=2)
    assert len(pairs) == 8 and {p["rank"] for p in pairs} == {0, 1}
    counts = ap.count_pairs(_scored_rows(), pairs)
    assert counts["by_answer_type"] == {"closed": {"entries": 2, "pairs": 4}, "open": {"entries": 2, "pairs": 4}}
    assert counts["by_modality"]["mri"] == {"entries": 2, "pairs": 4}


def test_false_negatives():
    fn = ap.false_negatives(_pairs())
    # "true" for a chosen "yes" and "not" for a chosen "no": two same-yes/no false negatives.
    assert fn["all"]["strict_normalized_equal"]["count"] == 0
    assert fn["all"]["same_answer_or_same_yes_no"]["count"] == 2
    assert fn["closed"]["same_answer_or_same_yes_no"]["n"] == 6
    # + "big" (synonym of "large") and "larg" (truncation).
    assert fn["all"]["loose_incl_synonym_and_truncation"]["count"] == 4
    # "no", "yes", "small" and "1" are right answers of their question text in train.
    assert fn["all"]["right_answer_to_same_question_text_in_train"]["count"] == 4
    assert fn["top_ranked_only"]["right_answer_to_same_question_text_in_train"]["rate"] == 1.0
    lo, hi = fn["all"]["loose_incl_synonym_and_truncation"]["ci95"]
    assert lo < 4 / 12 < hi
    # Entry 2: small > big (other right answer over a synonym), small > larg, big > larg.
    terms = fn["implicit_terms"]
    assert terms["terms"] == 12
    assert terms["by_classes"]["false_negative over false_negative"]["count"] == 1


def test_replacements_and_yes_no_flips():
    candidates = [{"id": "e0", "candidates": [{"text": "no", "level": 1, "positions": [0],
                                               "original_tokens": ["yes"], "replacement_tokens": [" No"]}]}]
    rp = ap.replacements(_pairs(), candidates)
    assert rp["closed_yes_no_flip"]["count"] == 2  # yes -> no, no -> yes
    # "true" for a chosen "yes" and "not" for a chosen "no" keep the polarity: still the two flips.
    assert rp["closed_polarity_flip_any_word"]["count"] == 2
    assert rp["inserted_tokens"] == {"no": 1}
    assert rp["matched_to_candidates"]["count"] == 1


def test_weights_quantiles_bounds_and_echo():
    w = ap.weight_report(_pairs(), clip=[0.8, 1.25])
    assert w["weights"]["min"] == pytest.approx(0.8)
    assert w["weights"]["median"] == pytest.approx(0.8)
    assert w["weights"]["q75"] == pytest.approx(1.2125)  # numpy's linear quantile of 8 x 0.8, 1.2, 3 x 1.25
    assert w["at_low_bound"]["count"] == 8 and w["at_high_bound"]["count"] == 3
    assert w["distinct_values"] == {"0.8": 8, "1.2": 1, "1.25": 3}
    # Pairs with a number: e0's "1" (score 1: echo) and e3's three (score 2 = chosen "2": echo).
    assert w["score_equals_a_number_in_chosen_or_dispreferred"]["count"] == 4
    assert w["score_equals_a_number_in_chosen_or_dispreferred"]["n"] == 4


def test_prior_direction():
    pr = ap.prior_report(ap.answer_sets(TRAIN), [_entry(i, q, a, k) for i, q, a, k, _, _ in ENTRIES], _pairs())
    assert pr["train_majority_share"]["count"] == 3 + 2 + 1  # "no" x3, "small" x2, "1" (tie with "2": "1")
    assert pr["train_majority_by_question"][Q_PRESENT]["majority"] == "no"
    cp = pr["contrast_pairs"]
    # yes -> no and large -> small and 2 -> 1 push away from the prior; no -> yes toward it.
    assert (cp["away_from_prior"], cp["toward_prior"], cp["neither_is_majority"]) == (3, 1, 0)
    assert cp["weight_away"] == pytest.approx(0.8 + 0.8 + 1.25)


def test_prediction_report_and_teacher_forced():
    rows = [_entry(i, q, a, k) for i, q, a, k, _, _ in ENTRIES]
    report = ap.prediction_report(rows, ["yes", "yes", "small", "1"], {"e1": ["yes"], "e2": ["small"]},
                                  ap.answer_sets(TRAIN))
    assert report["closed"]["right"]["count"] == 1
    assert report["all"]["answers_a_dispreferred"]["count"] == 2
    assert report["all"]["wrong_answer_is_a_dispreferred"]["count"] == 2
    assert report["all"]["wrong_answer_is_a_dispreferred"]["n"] == 3
    assert report["all"]["predicts_train_majority"]["count"] == 2  # "small" and "1"
    candidates = [{"id": f"e{i}", "chosen_logprob": lp} for i, lp in enumerate([-0.5, -2.0, -0.1, -3.0])]
    tf = ap.teacher_forced(candidates, _pairs())
    # every entry's best dispreferred log-prob is -1.0: e0 and e2 beat it.
    assert tf["all"]["chosen_beats_every_dispreferred"]["count"] == 2
    assert tf["chosen_is_train_majority"]["chosen_beats_every_dispreferred"]["n"] == 1  # e1 ("no")


def test_rate_and_bootstrap():
    r = ap.rate(0, 10)
    assert r["rate"] == 0.0 and r["ci95"][0] == 0.0 and 0.2 < r["ci95"][1] < 0.35
    ci = ap.cluster_bootstrap_ci([1, 0, 2, 1, 0, 3], [3, 3, 3, 3, 3, 3])
    assert ci[0] < 7 / 18 < ci[1] and 0.0 <= ci[0] and ci[1] <= 1.0
    assert ap.cluster_bootstrap_ci([1, 1], [2, 2]) == [0.5, 0.5]


def test_cli_end_to_end(tmp_path):
    ws = tmp_path / "ws"
    write_rows(TRAIN, ws / "data/prepared/train.parquet", VQA_SCHEMA)
    pool = [{**_entry(i, q, a, k, m), "mine_strategy": "balanced", "mine_score": None, "mine_reason": None}
            for i, q, a, k, m, _ in ENTRIES]
    write_rows(pool, ws / "data/pool.parquet", POOL_SCHEMA)
    scored = _scored_rows()
    write_rows(scored, ws / "data/scored.parquet", SCORED_SCHEMA)
    candidates = [{**_entry(i, q, a, k, m), "chosen_token_ids": [1], "chosen_logprob": -0.5, "sensitivity": [0.1],
                   "visual_dispreferred": None,
                   "candidates": [{"text": t, "token_ids": [2], "level": r + 1, "positions": [0],
                                   "original_tokens": [a], "replacement_tokens": [t], "logprob": -1.0 - r}
                                  for r, (t, _, _) in enumerate(rej)]}
                  for i, q, a, k, m, rej in ENTRIES]
    write_rows(candidates, ws / "data/candidates.parquet", CANDIDATES_SCHEMA)
    preds = [{"id": f"t{i}", "model": "sft", "question": q, "answer": a, "prediction": "no", "answer_type": k,
              "modality": "ct", "question_type": "q", "score": None} for i, (q, a, k) in
             enumerate([(Q_PRESENT, "yes", "closed"), (Q_PRESENT, "no", "closed")])]
    write_rows(preds, ws / "reports/predictions/sft.parquet", PREDICTION_SCHEMA)
    (ws / "params.yaml").write_text(yaml.safe_dump(
        {"train": {"loss": "mlpo", "max_rejected": 2, "weighted": True, "gamma": 0.1},
         "score": {"weights": {"mu": 1.0, "sigma": 0.3, "clip": [0.75, 1.25]}}}))
    out, md = tmp_path / "out/pairs.json", tmp_path / "out/pairs.md"
    assert ap.main(["--workspace", str(ws), "--output", str(out), "--markdown", str(md), "--no-generate"]) == 0
    result = json.loads(out.read_text())
    assert result["counts"]["pairs"] == 8  # max_rejected 2
    assert result["replacements"]["matched_to_candidates"]["rate"] == 1.0
    assert result["sft"]["greedy_on_pool"] is None
    assert result["sft"]["sft_on_test"]["all"]["predicts_train_majority"]["count"] == 2
    assert result["weights"]["at_high_bound"]["count"] == 2
    text = md.read_text()
    assert text.startswith("```\npython scripts/analyze_pairs.py --workspace")
    assert "Greedy answers on the pool: not measured" in text
