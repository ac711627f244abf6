"""LLaVA-Med's `run_eval.py` reproduced exactly, quirks included: the numbers papers publish.

The reference is LLaVA-Med v1.5's `llava/eval/run_eval.py` with `eval_metrics/glossary.py`,
`evaluate_metrics.py` and `utils.py` (microsoft/LLaVA-Med, commit ad758b6), the evaluation behind
HSCR's and MMedPO's Med-VQA tables. `pipeline.metrics` holds our own, corrected metrics (the
`strict` family); this module exists so our numbers can stand beside published ones. Every
function mirrors one of theirs, line for line where it matters, and `tests/test_legacy_metrics.py`
checks hand-computed cases.

What `run_eval.py` does, and what each quirk does to a number:

- **Normalization** (`normalize_word`): lowercase first; punctuation marks deleted from the whole
  string when any occurrence of that mark touches a space (or when the string has a
  digit-grouping comma), replaced by a space otherwise; then `period_strip.sub("", s, re.UNICODE)`
  deletes every period not followed by a digit, but at most 32 of them (`re.UNICODE` lands in
  the `count` argument); number words and "none" to digits, articles dropped, contractions
  restored ("somebody'd" becomes "somebodyd", a typo in its table), commas deleted.
- **Closed ("yes/no accuracy")**: `if 'yes' in pred or 'no' in pred: if gt in pred: hit(1)`,
  `else: hit(0)`, all substring tests. A prediction that contains "yes" or "no" anywhere (in
  "nodule", "normal", "know", "not" too) but not the ground truth appends **nothing**: the wrong
  answer leaves the denominator. A prediction without either appends a 0. So the score is
  correct / (correct + answers without "yes"/"no"), and a model that always says "yes" or "no"
  scores 100% however often it is wrong; a right answer is also found inside a longer word
  ("no" in "nodule"). Closed questions whose answer is not yes/no go through the same gate.
  `closed_counted` reports the denominator, so the inflation is visible.
- **Open recall** (`calculate_f1score(pred, gt)[2]`, the "Open" column of HSCR and MMedPO):
  true positives add the *prediction's* count of each shared word, so repeating a ground-truth
  word raises recall (above 1 is possible); an empty prediction or ground truth scores 0.
- **Open accuracy** (`calculate_appearance_with_normalization`): the prediction is mapped to the
  candidate answer (LLaVA-Med's `candidate.json`: every answer of the dataset) sharing the
  largest share of the candidate's words, the first such in list order, and scores 1 when that
  candidate equals the ground truth. Here the candidates are the test split's distinct ground
  truths in order of first appearance.
- **Exact match**: distinct ground-truth words found in the prediction / prediction words.
- **Counts**: `run_eval.py` prints `num_open` = the closed count and `num_close` = the open count
  (swapped labels); we report `n_closed` and `n_open` by their meaning.
- Later forks changed the denominator: Med-MoE and others append 0 for a wrong yes/no answer
  (plain accuracy over closed questions). This module follows LLaVA-Med v1.5 as released.
  BLEU (nltk's `sentence_bleu` on open answers) is not reproduced.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.metrics import ARTICLES, CONTRACTIONS, NUMBER_WORDS

# glossary.py's tables: its contractions with its typo entry (its capitalized keys never match
# the lowercased words, so `CONTRACTIONS`'s lowercased copy behaves the same).
LEGACY_CONTRACTIONS = {**CONTRACTIONS, "somebody'd": "somebodyd"}
LEGACY_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead for "<=digit", not a lookbehind
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def normalize_word(token: str) -> str:
    """glossary.py's `normalize_word`."""
    _token = token
    for p in LEGACY_PUNCT:
        if (p + " " in token or " " + p in token) or (re.search(_COMMA_STRIP, token) is not None):
            _token = _token.replace(p, "")
        else:
            _token = _token.replace(p, " ")
    token = _PERIOD_STRIP.sub("", _token, re.UNICODE)  # sic: re.UNICODE (32) is the `count` argument
    words = []
    for word in token.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    words = [LEGACY_CONTRACTIONS.get(w, w) for w in words]
    return " ".join(words).replace(",", "")


def split_sentence(sentence: str, n: int) -> dict[str, int]:
    """utils.py's `split_sentence`: counts of the sentence's word n-grams."""
    words: dict[str, int] = defaultdict(int)
    tokens = sentence.lower().strip().split()
    for i in range(len(tokens) - n + 1):
        gram = " ".join(tokens[i: i + n])
        if gram:
            words[gram] += 1
    return words


def calculate_f1score(candidate: str, reference: str) -> tuple[float, float, float]:
    """evaluate_metrics.py's `calculate_f1score`: (f1, precision, recall) of prediction `candidate`."""
    candidate, reference = normalize_word(candidate), normalize_word(reference)
    candidate_words, reference_words = split_sentence(candidate, 1), split_sentence(reference, 1)
    tp = fp = fn = 0
    for word in set(candidate_words) | set(reference_words):
        if word in candidate_words and word in reference_words:
            tp += candidate_words[word]
        elif word in candidate_words:
            fp += candidate_words[word]
        else:
            fn += reference_words[word]
    if not candidate_words or not reference_words:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    if tp == 0:
        return 0.0, 0.0, 0.0
    return 2 * precision * recall / (precision + recall), precision, recall


def calculate_exactmatch(candidate: str, reference: str) -> float:
    """evaluate_metrics.py's `calculate_exactmatch`."""
    candidate_words = split_sentence(normalize_word(candidate), 1)
    reference_words = split_sentence(normalize_word(reference), 1)
    count = sum(1 for word in reference_words if word in candidate_words)
    total = sum(candidate_words.values())
    return 0.0 if total == 0 else count / total


def calculate_appearance_with_normalization(prediction: str, reference: str, candidates: Sequence[str]) -> float:
    """evaluate_metrics.py's open "accuracy": 1 if the candidate answer closest to the prediction
    (largest share of the candidate's words in the prediction, first in list order) is the reference."""
    prediction_words = split_sentence(normalize_word(prediction), 1)
    reference = normalize_word(reference)
    normalized, similarity = [], []
    for candidate in candidates:
        candidate = normalize_word(str(candidate))
        normalized.append(candidate)
        candidate_words = split_sentence(candidate, 1)
        count = sum(1 for word in prediction_words if word in candidate_words)
        similarity.append(count / len(candidate_words) if candidate_words else 0.0)
    if not normalized:
        raise ValueError("calculate_appearance_with_normalization: no candidate answers")
    return 1.0 if normalized[similarity.index(max(similarity))] == reference else 0.0


def legacy_summary(rows: Sequence[dict], candidates: Sequence[str]) -> dict[str, Any]:
    """`run_eval.py`'s numbers (fractions, not percentages) for prediction rows with `answer`,
    `prediction` and `answer_type` (closed | open); `candidates` are the answers open predictions
    are mapped to. A family with no question gives None (LLaVA-Med divides by zero there)."""
    closed_hits: list[int] = []
    recall, precision, f1, exact, open_hits = [], [], [], [], []
    for row in rows:
        gt = normalize_word(str(row["answer"]).lower())
        pred = normalize_word(str(row["prediction"]).lower())
        if row["answer_type"] == "open":
            open_hits.append(calculate_appearance_with_normalization(pred, gt, candidates))
            exact.append(calculate_exactmatch(pred, gt))
            f, p, r = calculate_f1score(pred, gt)
            f1.append(f)
            precision.append(p)
            recall.append(r)
        elif row["answer_type"] == "closed":
            if "yes" in pred or "no" in pred:
                if gt in pred:
                    closed_hits.append(1)
            else:
                closed_hits.append(0)

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    n_closed = sum(r["answer_type"] == "closed" for r in rows)
    return {
        "closed_accuracy": (sum(closed_hits) / len(closed_hits) if closed_hits else 0.0) if n_closed else None,
        "closed_counted": len(closed_hits),
        "n_closed": n_closed,
        "open_recall": mean(recall),
        "open_accuracy": mean(open_hits),
        "open_precision": mean(precision),
        "open_f1": mean(f1),
        "open_exact_match": mean(exact),
        "n_open": len(recall),
    }


def candidate_answers(rows: Sequence[dict]) -> list[str]:
    """The distinct ground-truth answers of `rows` in order of first appearance (LLaVA-Med's
    `candidate.json` holds every answer of the dataset)."""
    return list(dict.fromkeys(str(r["answer"]) for r in rows))


def legacy_reports(predictions: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """`legacy_summary` of every model's prediction rows (`{"sft": rows, "sft_blind": rows, ...}`),
    all against one candidate list: the answers of the first table (every table answers the same
    test split)."""
    if not predictions:
        return {}
    candidates = candidate_answers(next(iter(predictions.values())))
    return {key: legacy_summary(rows, candidates) for key, rows in predictions.items()}


def legacy_reports_by_dataset(predictions: dict[str, list[dict]], dataset_of: Mapping[str, str]
                              ) -> dict[str, dict[str, dict[str, Any]]]:
    """`legacy_reports` of each dataset of the test split on its own (`{"sft": {"vqa-rad": ...}}`),
    as LLaVA-Med runs `run_eval.py` once per benchmark, with that benchmark's answers as the
    candidate list; `dataset_of` maps a test row's id to its dataset. Empty when the split holds
    one dataset."""
    if not predictions:
        return {}
    datasets = sorted({dataset_of[r["id"]] for r in next(iter(predictions.values()))})
    if len(datasets) < 2:
        return {}
    per_dataset = {d: legacy_reports({k: [r for r in rows if dataset_of[r["id"]] == d]
                                      for k, rows in predictions.items()})
                   for d in datasets}
    return {key: {d: per_dataset[d][key] for d in datasets} for key in predictions}
