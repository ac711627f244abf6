"""Med-VQA evaluation metrics following the LLaVA-Med protocol (`llava/eval/run_eval.py`).

LLaVA-Med normalizes both the ground truth and the prediction with the VQA-v2 answer normalizer
(lowercase, punctuation, number words to digits, articles dropped, contractions restored), then
scores

- closed questions by accuracy: the ground truth must appear in the prediction;
- open questions by token recall: the share of ground-truth tokens found in the prediction.

Deviations from the released LLaVA-Med code, each a fix of a behaviour that makes its numbers
depend on accidents of spelling rather than on the answer:

1. Closed containment is word-level: the ground-truth token sequence must occur as a contiguous
   run of prediction tokens. LLaVA-Med tests the substring `gt in pred`, so "no" is found inside
   "nodule" or "normal", and "left" inside "cleft".
2. LLaVA-Med gates closed answers on the substring "yes" or "no" (matched inside words too): a
   prediction without either scores 0, and one with either that misses the ground truth is
   left out of the denominator altogether (nothing is appended), so wrong yes/no answers do not
   count. That gate is dropped: every closed question counts, and those whose answer is not
   yes/no ("left", "ct") are scored by containment like the rest. `pipeline.legacy_metrics`
   reproduces the original for comparison with published numbers.
3. Punctuation is always replaced by a space. The VQA normalizer deletes a mark from the whole
   string when it sits next to a space anywhere (or when any digit-grouping comma is present)
   and otherwise replaces it by a space, so "x-ray" normalized to "x ray" or "xray" depending on
   the rest of the sentence. Commas that group digits ("1,000") are still deleted.
4. Recall clips repeated tokens: LLaVA-Med adds the prediction's count of a shared word to the
   true positives, so repeating a ground-truth word in the prediction inflates recall.
5. A ground truth that normalizes to nothing (e.g. "the") scores 1 only against a prediction
   that also normalizes to nothing; LLaVA-Med's containment would credit every prediction.

Kept quirks of the VQA normalizer: "none" maps to "0" like the number words "zero".."ten",
apostrophes inside words are kept so its contraction table ("dont" -> "don't") applies, and a
period is kept only where it is a decimal point ("3.5", ".5").
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

ANSWER_TYPES = ("closed", "open")

# VQA-v2 `manualMap`, "none" included: it is what LLaVA-Med's numbers were computed with.
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# VQA-v2 contraction table, lowercased (inputs are lowercased first, so its capitalized keys such
# as "Im" could never match) and without its "somebody'd" -> "somebodyd" typo.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "id've": "i'd've", "i'dve": "i'd've", "im": "i'm",
    "ive": "i've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

_CURLY_APOSTROPHES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'"})
# "1,000" -> "1000": a comma followed by exactly three digits groups digits.
_DIGIT_GROUP_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A period survives only as a decimal point: followed by a digit and not preceded by a letter
# ("3.5", ".5" and "t2.5" keep it; "end.", "u.s." and "e.g." lose it).
_NON_DECIMAL_PERIOD = re.compile(r"\.(?!\d)|(?<=[^\W\d])\.")
# Everything that is neither a word character, whitespace, apostrophe nor period; "_" counts as
# punctuation (it is in the VQA list) although regex treats it as a word character.
_PUNCT = re.compile(r"[^\w\s'.]|_")
# Apostrophes used as quotation marks rather than inside a word ("'left'", "patients'").
_STRAY_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")


def _tokens(text: str) -> list[str]:
    text = text.lower().translate(_CURLY_APOSTROPHES)
    text = _DIGIT_GROUP_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    text = _PUNCT.sub(" ", text)
    text = _STRAY_APOSTROPHE.sub(" ", text)
    out = []
    for word in text.split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        out.append(CONTRACTIONS.get(word, word))
    return out


def normalize_answer(text: str) -> str:
    """Normalize an answer as LLaVA-Med does (VQA-v2 normalizer), with the fixes in the module doc.

    Lowercase; digit-grouping commas and non-decimal periods deleted; other punctuation replaced
    by a space; number words "none", "zero".."ten" to digits; articles dropped; apostrophe-less
    contractions restored; whitespace collapsed.
    """
    return " ".join(_tokens(text))


def _contains_run(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def closed_correct(prediction: str, answer: str) -> float:
    """1.0 when the normalized answer occurs as a whole-word run in the normalized prediction.

    Word-level rather than LLaVA-Med's substring test, so answer "no" does not match "nodule".
    """
    gt = _tokens(answer)
    pred = _tokens(prediction)
    if not gt:
        return float(not pred)
    return float(_contains_run(pred, gt))


def open_recall(prediction: str, answer: str) -> float:
    """Share of normalized ground-truth tokens that occur in the normalized prediction.

    Counts are clipped: a ground-truth token that occurs twice needs two occurrences in the
    prediction, and repeating a token in the prediction earns nothing extra.
    """
    gt = Counter(_tokens(answer))
    pred = Counter(_tokens(prediction))
    total = sum(gt.values())
    if total == 0:
        return float(not pred)
    hits = sum(min(count, pred[word]) for word, count in gt.items())
    return hits / total


def score_prediction(prediction: str, answer: str, answer_type: str) -> float:
    """Closed accuracy (0/1) or open recall (0..1), by `answer_type` ("closed"/"open", any case)."""
    kind = answer_type.strip().lower()
    if kind == "closed":
        return closed_correct(prediction, answer)
    if kind == "open":
        return open_recall(prediction, answer)
    raise ValueError(f"answer_type must be one of {ANSWER_TYPES} (any case), got {answer_type!r}")


def _group_summary(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    closed: list[float] = []
    open_: list[float] = []
    for row in rows:
        kind = str(row["answer_type"]).strip().lower()
        if kind == "closed":
            closed.append(float(row["score"]))
        elif kind == "open":
            open_.append(float(row["score"]))
        else:
            raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {row['answer_type']!r}")
    return {
        "closed_accuracy": sum(closed) / len(closed) if closed else None,
        "open_recall": sum(open_) / len(open_) if open_ else None,
        "n_closed": len(closed),
        "n_open": len(open_),
    }


def _by(rows: list[Mapping[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row[key]), []).append(row)
    # Sorted so that reports diff cleanly between runs.
    return {name: _group_summary(groups[name]) for name in sorted(groups)}


def summarize(rows: list[dict]) -> dict:
    """Aggregate scored rows (keys: answer_type, modality, question_type, score).

    Returns closed accuracy and open recall as fractions in [0, 1] (None when there is no row of
    that answer type), their counts, and the same four numbers per modality and per question type.
    """
    rows = list(rows)
    out = _group_summary(rows)
    out["by_modality"] = _by(rows, "modality")
    out["by_question_type"] = _by(rows, "question_type")
    return out


# ----- degenerate predictions -------------------------------------------------------------------
# A model that answers nothing, or one string, to most questions of a type has collapsed: its
# accuracy then measures how often that string is the answer, not what it sees. Fixed thresholds,
# not params: they flag a collapse (a decoding cap that cuts every answer, a broken checkpoint, a
# blind control stuck on its prior), not a weak model, and a report must not be able to silence them.
MOSTLY_EMPTY_SHARE = 0.5  # flagged above this share of empty predictions of a type
CONSTANT_SHARE = 0.9  # flagged above this share of one (non-empty) prediction of a type ...
MIN_DISTINCT_ANSWERS = 2  # ... whose reference answers take at least this many values


def degeneracy(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per answer type, how degenerate one model's predictions are (keys: answer_type, answer,
    prediction), compared after `normalize_answer`, the normalization the metrics score.

    `empty_share`: the share of predictions that normalize to nothing; `top_prediction`,
    `top_share`: the most frequent non-empty normalized prediction (ties: the first in sort order)
    and its share of all the type's items; `distinct_answers`: distinct normalized reference
    answers. `mostly_empty`: `empty_share` > `MOSTLY_EMPTY_SHARE`; `constant`: `top_share` >
    `CONSTANT_SHARE` where the references take at least `MIN_DISTINCT_ANSWERS` values (a constant
    answer is no collapse where every reference is that answer); `flagged`: either. Every type of
    `ANSWER_TYPES` is reported; one without items has `n` 0, null shares and no flag.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {kind: [] for kind in ANSWER_TYPES}
    for row in rows:
        kind = str(row["answer_type"]).strip().lower()
        if kind not in groups:
            raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {row['answer_type']!r}")
        groups[kind].append(row)
    out: dict[str, dict[str, Any]] = {}
    for kind, items in groups.items():
        n = len(items)
        predictions = Counter(normalize_answer(str(r["prediction"])) for r in items)
        empty = predictions.pop("", 0)
        top, top_count = min(predictions.items(), key=lambda kv: (-kv[1], kv[0])) if predictions else (None, 0)
        distinct = len({normalize_answer(str(r["answer"])) for r in items})
        empty_share = empty / n if n else None
        top_share = top_count / n if n else None
        mostly_empty = empty_share is not None and empty_share > MOSTLY_EMPTY_SHARE
        constant = top_share is not None and distinct >= MIN_DISTINCT_ANSWERS and top_share > CONSTANT_SHARE
        out[kind] = {"n": n, "empty_share": empty_share, "top_prediction": top, "top_share": top_share,
                     "distinct_answers": distinct, "mostly_empty": mostly_empty, "constant": constant,
                     "flagged": mostly_empty or constant}
    return out


def degeneracy_warnings(model: str, report: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per flagged answer type of a `degeneracy` report of `model`."""
    lines = []
    for kind, entry in report.items():
        if entry["mostly_empty"]:
            lines.append(f"{model}: {100 * entry['empty_share']:.1f}% of its {entry['n']} {kind} predictions are "
                         f"empty (after normalization)")
        if entry["constant"]:
            lines.append(f"{model}: {100 * entry['top_share']:.1f}% of its {entry['n']} {kind} predictions are "
                         f"{entry['top_prediction']!r}, against {entry['distinct_answers']} distinct reference answers")
    return lines
