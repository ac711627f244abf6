"""What the preference pairs teach: measurements on a workspace's `sample` / `rerank` / `score` artifacts.

    python scripts/analyze_pairs.py --workspace /tmp/fresh8 --output reports/analysis/pairs.json \
        --markdown reports/analysis/pairs.md

Reads (under --workspace): data/prepared/train.parquet, data/pool.parquet, data/candidates.parquet,
data/scored.parquet, params.yaml, reports/predictions/{sft,aligned}.parquet (test split) and, unless
--no-generate, models/sft (one greedy pass over the pool, as `evaluate` answers). Writes one JSON
file with:

1. `counts`: entries and (entry, dispreferred) pairs train sees, by answer type and modality;
2. `false_negatives`: dispreferred answers that are right answers to their own question (normalized
   equal; the same yes/no; a synonym or a truncation of the chosen word) or to another row of the
   same question text in the train split;
3. `replacements`: the words `sample` put in, and the closed pairs that are a bare yes<->no flip;
4. `weights`: the judges' per-pair weights (quantiles, clip bounds), and what the scores follow;
5. `sft`: whether the SFT model already gives the chosen answer (teacher-forced from `sample`'s
   log-probs; greedy answers on the pool), and its / the aligned model's answers on the test split;
6. `prior`: the train split's majority answer per question text, and whether the pairs push toward
   or away from it.

Rates carry a 95% Clopper-Pearson interval over pairs (`ci95`); the pair-level ones also a
percentile bootstrap over entries (`ci95_entries`: the pairs of one entry are not independent).
Every count is over `train`'s pairs: the top `train.max_rejected` of each entry (DPO: the top one).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

from pipeline.metrics import normalize_answer, score_prediction

# Words that say yes / no to a closed question (after `normalize_answer`). A dispreferred "not",
# "false" or "negative" to a chosen "no" says what the chosen answer says.
YES_WORDS = frozenset({"yes", "true", "positive", "correct", "present", "yeah", "yep", "affirmative"})
NO_WORDS = frozenset({"no", "not", "false", "negative", "incorrect", "absent", "nope"})
# Open-answer synonyms (same meaning, another word): one set per meaning.
SYNONYMS: tuple[frozenset[str], ...] = (
    frozenset({"large", "big", "enlarged", "huge", "larger"}),
    frozenset({"small", "little", "tiny", "smaller"}),
)

# Pair categories, exclusive, in the order they are tested (`classify_pair`).
CATEGORIES = (
    "identical",  # the chosen answer after normalize_answer (rerank removes these: expect 0)
    "same_yes_no",  # closed: a yes-word for a chosen yes, a no-word for a chosen no
    "synonym",  # open: another word for the chosen answer ("big" for "large")
    "truncation",  # a proper prefix of the chosen answer ("larg", "l", "n")
    "other_answer_same_question",  # a right answer of another train row with this question text
    "other_answer_other_word",  # another right answer in another word: closed, the other polarity not in
    # the answer set ("not" for a chosen "yes"); open, a synonym of another answer ("big" for "small")
    "answer_to_other_question",  # a right answer somewhere in train, never to this question text
    "off_vocabulary",  # none of the above ("5" to a 1..3 count, "front", "lung")
)
FALSE_NEGATIVE_STRICT = ("identical",)
FALSE_NEGATIVE_YES_NO = ("identical", "same_yes_no")
FALSE_NEGATIVE_LOOSE = ("identical", "same_yes_no", "synonym", "truncation")


# --------------------------------------------------------------------------------------------------
# Statistics


def rate(k: int, n: int) -> dict[str, Any]:
    """`k` of `n` with its 95% Clopper-Pearson interval (None where n = 0)."""
    if n == 0:
        return {"count": int(k), "n": 0, "rate": None, "ci95": None}
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="exact")
    return {"count": int(k), "n": int(n), "rate": k / n, "ci95": [float(ci.low), float(ci.high)]}


def cluster_bootstrap_ci(hits: Sequence[float], totals: Sequence[float], seed: int = 0,
                         resamples: int = 2000) -> list[float] | None:
    """95% percentile bootstrap interval of sum(hits) / sum(totals), resampling clusters (entries).

    Returns None with fewer than two clusters; a degenerate interval (every cluster's ratio the
    same) is returned as [rate, rate]."""
    h = np.asarray(hits, dtype=float)
    t = np.asarray(totals, dtype=float)
    if len(h) < 2 or t.sum() == 0:
        return None
    ratios = np.divide(h, t, out=np.zeros_like(h), where=t > 0)
    point = float(h.sum() / t.sum())
    if np.allclose(ratios[t > 0], ratios[t > 0][0]):
        return [point, point]

    def ratio(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return a.sum(axis=axis) / np.maximum(b.sum(axis=axis), 1e-12)

    res = stats.bootstrap((h, t), ratio, paired=True, vectorized=True, n_resamples=resamples,
                          confidence_level=0.95, method="percentile", random_state=np.random.default_rng(seed))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def pair_rate(pairs: Sequence[Mapping[str, Any]], hit: Callable[[Mapping[str, Any]], bool],
              seed: int = 0) -> dict[str, Any]:
    """The share of `pairs` for which `hit` holds: Clopper-Pearson over pairs, bootstrap over entries."""
    k = sum(1 for p in pairs if hit(p))
    out = rate(k, len(pairs))
    by_entry: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p in pairs:
        by_entry[p["id"]][0] += int(hit(p))
        by_entry[p["id"]][1] += 1
    counts = list(by_entry.values())
    out["ci95_entries"] = cluster_bootstrap_ci([c[0] for c in counts], [c[1] for c in counts], seed=seed)
    return out


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """n, min, quartiles, max, mean and population std of `values`."""
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=float)
    q25, q50, q75 = np.quantile(a, [0.25, 0.5, 0.75])
    return {"n": int(a.size), "min": float(a.min()), "q25": float(q25), "median": float(q50),
            "q75": float(q75), "max": float(a.max()), "mean": float(a.mean()), "std": float(a.std())}


# --------------------------------------------------------------------------------------------------
# Pairs


def used_rejected(loss: str, max_rejected: int | None) -> int | None:
    """How many dispreferred answers per entry `train` uses: DPO the top one, MLPO the top J (None: all)."""
    return 1 if loss == "dpo" else max_rejected


def explode_pairs(scored: Sequence[Mapping[str, Any]], keep: int | None) -> list[dict[str, Any]]:
    """One row per (entry, dispreferred answer) that train uses: the entry's fields, the rank (0 =
    most similar to the chosen answer), the dispreferred text, similarity, level, SFT log-prob, and
    the judges' score and weight."""
    pairs = []
    for row in scored:
        judgements = row.get("judgements") or [{}] * len(row["rejected"])
        for rank, (rej, judge) in enumerate(zip(row["rejected"], judgements, strict=True)):
            if keep is not None and rank >= keep:
                break
            pairs.append({
                "id": row["id"], "question": row["question"], "answer": row["answer"],
                "answer_type": str(row["answer_type"]).strip().lower(), "modality": row["modality"],
                "question_type": row.get("question_type"), "rank": rank, "text": rej["text"],
                "similarity": rej.get("similarity"), "level": rej.get("level"), "logprob": rej.get("logprob"),
                "score": judge.get("score"), "weight": judge.get("weight"),
            })
    return pairs


def answer_sets(train: Iterable[Mapping[str, Any]]) -> dict[str, Counter]:
    """The normalized ground-truth answers of each question text in the train split, with counts."""
    sets: dict[str, Counter] = defaultdict(Counter)
    for row in train:
        sets[row["question"]][normalize_answer(row["answer"])] += 1
    return dict(sets)


def polarity(text: str) -> str | None:
    """"yes" / "no" for a normalized closed answer that says so, else None."""
    if text in YES_WORDS:
        return "yes"
    if text in NO_WORDS:
        return "no"
    return None


def is_synonym(a: str, b: str) -> bool:
    return a != b and any(a in group and b in group for group in SYNONYMS)


def classify_pair(chosen: str, rejected: str, answer_type: str, same_question: Iterable[str],
                  all_answers: Iterable[str]) -> str:
    """The first of `CATEGORIES` that the dispreferred answer `rejected` falls in (see there)."""
    c, r = normalize_answer(chosen), normalize_answer(rejected)
    same_question = set(same_question)
    closed = answer_type.strip().lower() == "closed"
    if r == c:
        return "identical"
    if closed and polarity(r) is not None and polarity(r) == polarity(c):
        return "same_yes_no"
    if not closed and is_synonym(r, c):
        return "synonym"
    if r and c.startswith(r):
        return "truncation"
    if r in same_question:
        return "other_answer_same_question"
    if closed and polarity(r) is not None and polarity(c) is not None:
        return "other_answer_other_word"
    if not closed and any(is_synonym(r, a) for a in same_question if a != c):
        return "other_answer_other_word"
    if r in set(all_answers):
        return "answer_to_other_question"
    return "off_vocabulary"


def annotate_pairs(pairs: list[dict[str, Any]], train_sets: Mapping[str, Counter]) -> list[dict[str, Any]]:
    """`pairs` with `category`, `in_answer_set` (a right answer to this question text somewhere in train),
    and the question text's train `majority` answer (normalized; None for a text train lacks)."""
    all_answers = {a for counter in train_sets.values() for a in counter}
    out = []
    for p in pairs:
        answers = train_sets.get(p["question"], Counter())
        majority = majority_answer(answers)
        out.append({**p, "category": classify_pair(p["answer"], p["text"], p["answer_type"], answers, all_answers),
                    "in_answer_set": normalize_answer(p["text"]) in answers, "majority": majority})
    return out


def majority_answer(answers: Counter) -> str | None:
    """The most common answer (ties: alphabetical first), or None."""
    if not answers:
        return None
    return sorted(answers.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


# --------------------------------------------------------------------------------------------------
# 1. Counts


def count_pairs(scored: Sequence[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Entries and pairs train sees, in total and by answer type, modality and both."""
    def by(key: Callable[[Mapping[str, Any]], str]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"entries": 0, "pairs": 0})
        for row in scored:
            out[key(row)]["entries"] += 1
        for p in pairs:
            out[key(p)]["pairs"] += 1
        return {k: out[k] for k in sorted(out)}

    per_entry = Counter(Counter(p["id"] for p in pairs).values())
    return {
        "entries": len(scored), "pairs": len(pairs),
        "pairs_per_entry_histogram": {str(k): per_entry[k] for k in sorted(per_entry)},
        "by_answer_type": by(lambda r: str(r["answer_type"]).strip().lower()),
        "by_modality": by(lambda r: r["modality"]),
        "by_answer_type_and_modality": by(lambda r: f"{str(r['answer_type']).strip().lower()}/{r['modality']}"),
        "by_question_type": by(lambda r: str(r.get("question_type"))),
    }


# --------------------------------------------------------------------------------------------------
# 2. False negatives


def false_negatives(pairs: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, Any]:
    """How many dispreferred answers are right answers (see `CATEGORIES`), overall, by answer type and
    for the top-ranked pair of each entry."""
    def block(sel: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {
            "pairs": len(sel),
            "strict_normalized_equal": pair_rate(sel, lambda p: p["category"] in FALSE_NEGATIVE_STRICT, seed),
            "same_answer_or_same_yes_no": pair_rate(sel, lambda p: p["category"] in FALSE_NEGATIVE_YES_NO, seed),
            "loose_incl_synonym_and_truncation": pair_rate(
                sel, lambda p: p["category"] in FALSE_NEGATIVE_LOOSE, seed),
            "right_answer_to_same_question_text_in_train": pair_rate(sel, lambda p: bool(p["in_answer_set"]), seed),
            "categories": {c: pair_rate(sel, lambda p, c=c: p["category"] == c, seed) for c in CATEGORIES},
        }

    out = {"all": block(pairs)}
    for kind in sorted({p["answer_type"] for p in pairs}):
        out[kind] = block([p for p in pairs if p["answer_type"] == kind])
    out["top_ranked_only"] = block([p for p in pairs if p["rank"] == 0])
    out["implicit_terms"] = implicit_terms(pairs)
    out["sft_logprob_by_category"] = {
        c: distribution([float(p["logprob"]) for p in pairs if p["category"] == c and p["logprob"] is not None])
        for c in CATEGORIES if any(p["category"] == c for p in pairs)}
    examples: dict[str, Counter] = defaultdict(Counter)
    for p in pairs:
        examples[p["category"]][f"{normalize_answer(p['answer'])} -> {normalize_answer(p['text'])}"] += 1
    out["examples"] = {c: dict(examples[c].most_common(8)) for c in CATEGORIES if c in examples}
    return out


def pair_class(category: str) -> str:
    """Three coarse classes of a pair: `false_negative` (loose), `other_right_answer` (a right answer
    of the question text elsewhere, in its words or another), `other`."""
    if category in FALSE_NEGATIVE_LOOSE:
        return "false_negative"
    if category in ("other_answer_same_question", "other_answer_other_word"):
        return "other_right_answer"
    return "other"


def implicit_terms(pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """MLPO's implicit terms (j, m), j ranked above m, raise the reward of dispreferred j over m: the
    classes (`pair_class`) of j and m, counted over every such term of every entry."""
    by_entry: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for p in pairs:
        by_entry[p["id"]].append(p)
    terms: Counter = Counter()
    for group in by_entry.values():
        ranked = sorted(group, key=lambda p: p["rank"])
        for j in range(len(ranked)):
            for m in range(j + 1, len(ranked)):
                terms[f"{pair_class(ranked[j]['category'])} over {pair_class(ranked[m]['category'])}"] += 1
    total = sum(terms.values())
    return {"terms": total, "by_classes": {k: rate(v, total) for k, v in terms.most_common()}}


# --------------------------------------------------------------------------------------------------
# 3. Replaced tokens


def replacements(pairs: Sequence[Mapping[str, Any]], candidates: Sequence[Mapping[str, Any]] | None,
                 top: int = 15, seed: int = 0) -> dict[str, Any]:
    """The dispreferred words, the tokens `sample` replaced and put in (matched to the candidate by
    entry, text and level), and the closed pairs that only flip yes <-> no."""
    texts: dict[str, Counter] = defaultdict(Counter)
    for p in pairs:
        texts[p["answer_type"]][normalize_answer(p["text"])] += 1
    out: dict[str, Any] = {"dispreferred_words": {k: dict(texts[k].most_common(top)) for k in sorted(texts)}}
    if candidates is not None:
        index = {(row["id"], c["text"], c["level"]): c for row in candidates for c in row["candidates"]}
        inserted: Counter = Counter()
        replaced: Counter = Counter()
        positions: Counter = Counter()
        matched = 0
        for p in pairs:
            cand = index.get((p["id"], p["text"], p["level"]))
            if cand is None:
                continue
            matched += 1
            inserted.update(t.strip().lower() for t in cand["replacement_tokens"])
            replaced.update(t.strip().lower() for t in cand["original_tokens"])
            positions[len(cand["positions"])] += 1
        out.update({
            "matched_to_candidates": rate(matched, len(pairs)),
            "inserted_tokens": dict(inserted.most_common(top)),
            "replaced_tokens": dict(replaced.most_common(top)),
            "replaced_positions_histogram": {str(k): positions[k] for k in sorted(positions)},
        })
    closed = [p for p in pairs if p["answer_type"] == "closed"]

    def flip(p: Mapping[str, Any]) -> bool:
        return {normalize_answer(p["answer"]), normalize_answer(p["text"])} == {"yes", "no"}

    def polarity_flip(p: Mapping[str, Any]) -> bool:
        pc, pr = polarity(normalize_answer(p["answer"])), polarity(normalize_answer(p["text"]))
        return pc is not None and pr is not None and pc != pr

    out["closed_yes_no_flip"] = pair_rate(closed, flip, seed)
    out["closed_polarity_flip_any_word"] = pair_rate(closed, polarity_flip, seed)
    top_closed = [p for p in closed if p["rank"] == 0]
    out["closed_top_ranked_is_yes_no_flip"] = rate(sum(flip(p) for p in top_closed), len(top_closed))
    return out


# --------------------------------------------------------------------------------------------------
# 4. Weights


def _number(text: str) -> int | None:
    t = normalize_answer(text)
    return int(t) if t.isdigit() else None


def weight_report(pairs: Sequence[Mapping[str, Any]], clip: Sequence[float] | None,
                  seed: int = 0) -> dict[str, Any]:
    """The per-pair weights: distribution, distinct values, how many sit at the clip bounds, by
    category; the judges' scores; and how often a score is just a number in the chosen or
    dispreferred text (a judge echoing the answer rather than judging it)."""
    weighted = [p for p in pairs if p["weight"] is not None]
    w = [float(p["weight"]) for p in weighted]
    out: dict[str, Any] = {"weights": distribution(w)}
    if w:
        values = Counter(round(x, 6) for x in w)
        out["distinct_values"] = {str(k): values[k] for k in sorted(values)}
        out["max_over_min"] = max(w) / min(w) if min(w) > 0 else None
        out["coefficient_of_variation"] = float(np.std(w) / np.mean(w))
    if clip is not None and w:
        low, high = float(clip[0]), float(clip[1])
        out["clip"] = [low, high]
        out["at_low_bound"] = rate(sum(math.isclose(x, low, abs_tol=1e-9) for x in w), len(w))
        out["at_high_bound"] = rate(sum(math.isclose(x, high, abs_tol=1e-9) for x in w), len(w))
    by_cat = {}
    for c in CATEGORIES:
        sel = [float(p["weight"]) for p in weighted if p["category"] == c]
        if sel:
            by_cat[c] = {"n": len(sel), "mean": float(np.mean(sel)), "min": min(sel), "max": max(sel)}
    out["by_category"] = by_cat
    scores = [p["score"] for p in pairs]
    out["scores"] = {**distribution([float(s) for s in scores if s is not None]),
                     "missing": sum(s is None for s in scores),
                     "histogram": dict(sorted(Counter(str(s) for s in scores).items()))}

    def echo(p: Mapping[str, Any]) -> bool:
        return p["score"] is not None and float(p["score"]) in {
            n for n in (_number(p["answer"]), _number(p["text"])) if n is not None}

    def has_number(p: Mapping[str, Any]) -> bool:
        return _number(p["answer"]) is not None or _number(p["text"]) is not None

    with_number = [p for p in pairs if has_number(p)]
    chosen_number = [p for p in pairs if _number(p["answer"]) is not None and p["score"] is not None]
    out["score_equals_a_number_in_chosen_or_dispreferred"] = pair_rate(with_number, echo, seed)
    out["score_equals_chosen_number"] = pair_rate(
        chosen_number, lambda p: float(p["score"]) == _number(p["answer"]), seed)
    no_number = [p for p in pairs if not has_number(p) and p["score"] is not None]
    out["score_zero_when_no_number_in_texts"] = pair_rate(no_number, lambda p: float(p["score"]) == 0.0, seed)
    return out


# --------------------------------------------------------------------------------------------------
# 5. The SFT model


def teacher_forced(candidates: Sequence[Mapping[str, Any]], pairs: Sequence[Mapping[str, Any]]
                   ) -> dict[str, Any]:
    """From `sample`'s log-probs under the SFT model (full image): the probability of the chosen
    answer (with its end of turn), and how often the SFT model already puts more on the chosen
    answer than on every dispreferred answer train uses, by answer type."""
    chosen = {row["id"]: float(row["chosen_logprob"]) for row in candidates}
    rejected: dict[str, list[float]] = defaultdict(list)
    kinds: dict[str, str] = {}
    major: dict[str, bool] = {}
    for p in pairs:
        if p["logprob"] is not None:
            rejected[p["id"]].append(float(p["logprob"]))
        kinds[p["id"]] = p["answer_type"]
        major[p["id"]] = normalize_answer(p["answer"]) == p.get("majority")
    groups: dict[str, Callable[[str], bool]] = {k: (lambda i, k=k: kinds[i] == k) for k in sorted(set(kinds.values()))}
    groups["all"] = lambda i: True
    groups["chosen_is_train_majority"] = lambda i: major[i]
    groups["chosen_is_not_train_majority"] = lambda i: not major[i]
    out: dict[str, Any] = {}
    for kind, member in groups.items():
        ids = [i for i in rejected if i in chosen and member(i)]
        beats = sum(chosen[i] > max(rejected[i]) for i in ids)
        out[kind] = {"chosen_beats_every_dispreferred": rate(beats, len(ids)),
                     "p_chosen": distribution([math.exp(chosen[i]) for i in ids]),
                     "p_chosen_above_half": rate(sum(math.exp(chosen[i]) > 0.5 for i in ids), len(ids))}
    return out


def prediction_report(rows: Sequence[Mapping[str, Any]], predictions: Sequence[str],
                      dispreferred: Mapping[str, Sequence[str]] | None = None,
                      train_sets: Mapping[str, Counter] | None = None) -> dict[str, Any]:
    """How many `predictions` are right (the project's score: closed accuracy, open recall = 1), by
    answer type; how many equal one of the entry's dispreferred answers (normalized); and how many are
    the question text's train majority answer, beside the truth's share of it."""
    out: dict[str, Any] = {}
    kinds = sorted({str(r["answer_type"]).strip().lower() for r in rows})
    pairs_ = list(zip(rows, predictions, strict=True))
    groups = {k: [(r, p) for r, p in pairs_ if str(r["answer_type"]).strip().lower() == k] for k in kinds}
    groups["all"] = pairs_
    if train_sets is not None:
        def is_major(r: Mapping[str, Any]) -> bool:
            return (r["question"] in train_sets
                    and normalize_answer(r["answer"]) == majority_answer(train_sets[r["question"]]))

        groups["truth_is_train_majority"] = [(r, p) for r, p in pairs_ if is_major(r)]
        groups["truth_is_not_train_majority"] = [(r, p) for r, p in pairs_ if not is_major(r)]
    for kind, sel in groups.items():
        right = sum(score_prediction(p, r["answer"], r["answer_type"]) == 1.0 for r, p in sel)
        block: dict[str, Any] = {"right": rate(right, len(sel))}
        if dispreferred is not None:
            def among(r: Mapping[str, Any], p: str) -> bool:
                return normalize_answer(p) in {normalize_answer(t) for t in dispreferred.get(r["id"], ())}

            wrong = [(r, p) for r, p in sel if score_prediction(p, r["answer"], r["answer_type"]) < 1.0]
            block["answers_a_dispreferred"] = rate(sum(among(r, p) for r, p in sel), len(sel))
            block["wrong_answer_is_a_dispreferred"] = rate(sum(among(r, p) for r, p in wrong), len(wrong))
        if train_sets is not None:
            known = [(r, p) for r, p in sel if r["question"] in train_sets]
            maj = {r["question"]: majority_answer(train_sets[r["question"]]) for r, _ in known}
            block["predicts_train_majority"] = rate(
                sum(normalize_answer(p) == maj[r["question"]] for r, p in known), len(known))
            block["truth_is_train_majority"] = rate(
                sum(normalize_answer(r["answer"]) == maj[r["question"]] for r, _ in known), len(known))
        out[kind] = block
    return out


def generate_sft(model_dir: Path, rows: list[dict], batch_size: int, max_new_tokens: Mapping[str, int]) -> list[str]:
    """Greedy answers of the model in `model_dir` to `rows`, as `evaluate` decodes them."""
    import torch

    from pipeline.evaluation import MaxNewTokens, predict
    from pipeline.models.profiles import load_vlm

    torch.manual_seed(0)
    vlm = load_vlm(model_dir)
    with torch.inference_mode():
        return predict(vlm, rows, batch_size, MaxNewTokens(**max_new_tokens), desc="sft on pool")


# --------------------------------------------------------------------------------------------------
# 6. The language prior


def prior_report(train_sets: Mapping[str, Counter], pool: Sequence[Mapping[str, Any]],
                 pairs: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, Any]:
    """The train split's majority answer per question text; the pool's chosen answers; and the pairs
    whose dispreferred answer is another right answer of the question text: toward the prior (chosen =
    majority: the pair pushes the minority answer down) or away from it (dispreferred = majority)."""
    per_question = {}
    total_major = total = 0
    for q in sorted(train_sets):
        answers = train_sets[q]
        maj = majority_answer(answers)
        n = sum(answers.values())
        per_question[q] = {"majority": maj, "answers": len(answers), **rate(answers[maj], n)}
        total_major += answers[maj]
        total += n
    majority = {q: v["majority"] for q, v in per_question.items()}
    known = [r for r in pool if r["question"] in majority]
    out: dict[str, Any] = {
        "train_majority_share": rate(total_major, total),
        "train_majority_by_question": per_question,
        "pool_chosen_is_majority": rate(sum(normalize_answer(r["answer"]) == majority[r["question"]]
                                            for r in known), len(known)),
        "pairs_dispreferred_is_majority": pair_rate(pairs, lambda p: normalize_answer(p["text"]) == p["majority"],
                                                    seed),
        "pairs_chosen_is_majority": pair_rate(pairs, lambda p: normalize_answer(p["answer"]) == p["majority"], seed),
    }
    contrast = [p for p in pairs if p["in_answer_set"] and p["category"] == "other_answer_same_question"]
    toward = [p for p in contrast if normalize_answer(p["answer"]) == p["majority"]]
    away = [p for p in contrast if normalize_answer(p["text"]) == p["majority"]]
    directional = len(toward) + len(away)
    test = stats.binomtest(len(away), directional) if directional else None
    out["contrast_pairs"] = {
        "pairs": len(contrast),
        "toward_prior": len(toward), "away_from_prior": len(away),
        "neither_is_majority": len(contrast) - directional,
        "away_share_of_directional": rate(len(away), directional),
        "p_value_vs_half": None if test is None else float(test.pvalue),
        "weight_toward": float(sum(p["weight"] or 0.0 for p in toward)),
        "weight_away": float(sum(p["weight"] or 0.0 for p in away)),
    }
    for kind in sorted({p["answer_type"] for p in contrast}):
        t = sum(1 for p in toward if p["answer_type"] == kind)
        a = sum(1 for p in away if p["answer_type"] == kind)
        out["contrast_pairs"][kind] = {"toward_prior": t, "away_from_prior": a,
                                       "away_share_of_directional": rate(a, t + a),
                                       "p_value_vs_half": float(stats.binomtest(a, t + a).pvalue) if t + a else None}
    return out


# --------------------------------------------------------------------------------------------------
# The whole analysis


def read_params(workspace: Path) -> dict[str, Any]:
    with open(workspace / "params.yaml") as f:
        return yaml.safe_load(f)


def analyze(workspace: Path, generate: bool = True, seed: int = 0) -> dict[str, Any]:
    """Every measurement of the module docstring on the artifacts under `workspace`."""
    from pipeline.schema import (
        CANDIDATES_SCHEMA,
        POOL_SCHEMA,
        PREDICTION_SCHEMA,
        SCORED_SCHEMA,
        VQA_SCHEMA,
        read_rows,
    )

    params = read_params(workspace)
    train_cfg = params.get("train", {})
    keep = used_rejected(train_cfg.get("loss", "mlpo"), train_cfg.get("max_rejected"))
    train = read_rows(workspace / "data/prepared/train.parquet", VQA_SCHEMA)
    pool = read_rows(workspace / "data/pool.parquet", POOL_SCHEMA)
    candidates = read_rows(workspace / "data/candidates.parquet", CANDIDATES_SCHEMA)
    scored = read_rows(workspace / "data/scored.parquet", SCORED_SCHEMA)
    train_sets = answer_sets(train)
    pairs = annotate_pairs(explode_pairs(scored, keep), train_sets)
    clip = params.get("score", {}).get("weights", {}).get("clip")

    result: dict[str, Any] = {
        "workspace": str(workspace),
        "train_config": {"loss": train_cfg.get("loss"), "max_rejected": train_cfg.get("max_rejected"),
                         "weighted": train_cfg.get("weighted"), "gamma": train_cfg.get("gamma"),
                         "pairs_used_per_entry": keep},
        "intervals": "ci95: Clopper-Pearson over pairs (or entries); ci95_entries: percentile bootstrap over "
                     "entries (2000 resamples, seed 0)",
        "counts": count_pairs(scored, pairs),
        "false_negatives": false_negatives(pairs, seed),
        "replacements": replacements(pairs, candidates, seed=seed),
        "weights": weight_report(pairs, clip, seed),
        "prior": prior_report(train_sets, pool, pairs, seed),
    }
    sft: dict[str, Any] = {"teacher_forced_on_pool": teacher_forced(candidates, pairs)}
    dispreferred = defaultdict(list)
    for p in pairs:
        dispreferred[p["id"]].append(p["text"])
    scored_ids = {r["id"] for r in scored}
    pool_rows = [r for r in pool if r["id"] in scored_ids]
    if generate and (workspace / "models/sft").is_dir():
        cfg = params.get("evaluate", {})
        answers = generate_sft(workspace / "models/sft", pool_rows, int(cfg.get("batch_size", 32)),
                               cfg.get("max_new_tokens", {"closed": 5, "open": 16}))
        sft["greedy_on_pool"] = prediction_report(pool_rows, answers, dispreferred, train_sets)
        sft["greedy_on_pool"]["examples_wrong"] = [
            {"question": r["question"], "answer": r["answer"], "sft": a}
            for r, a in zip(pool_rows, answers, strict=True)
            if score_prediction(a, r["answer"], r["answer_type"]) < 1.0][:10]
    else:
        sft["greedy_on_pool"] = None
        sft["greedy_on_pool_note"] = "not measured (--no-generate or no models/sft)"
    for name in ("sft", "aligned", "sft_blind", "aligned_blind"):
        path = workspace / f"reports/predictions/{name}.parquet"
        if path.exists():
            rows = read_rows(path, PREDICTION_SCHEMA)
            sft[f"{name}_on_test"] = prediction_report(rows, [r["prediction"] for r in rows],
                                                       train_sets=train_sets)
    result["sft"] = sft
    return result


# --------------------------------------------------------------------------------------------------
# Markdown


def _pct(r: Mapping[str, Any] | None, key: str = "ci95") -> str:
    if not r or r.get("rate") is None:
        return "n/a"
    ci = r.get(key) or r.get("ci95")
    return f"{100 * r['rate']:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] ({r['count']}/{r['n']})"


def markdown(result: Mapping[str, Any], command: str) -> str:
    """The numbers of `result` as a Markdown list (one line per measurement), the command on top."""
    c, fn, rp, w, pr, s = (result[k] for k in ("counts", "false_negatives", "replacements", "weights",
                                                 "prior", "sft"))
    at = c["by_answer_type"]
    cats = fn["all"]["categories"]
    lines = [
        "```", command, "```", "",
        f"Pairs train sees ({result['train_config']['loss']}, top {result['train_config']['pairs_used_per_entry']} "
        "per entry). Intervals: 95% Clopper-Pearson over pairs; where marked *, a bootstrap over entries.", "",
        f"1. **Pairs.** {c['entries']} entries, {c['pairs']} pairs: "
        + ", ".join(f"{k} {v['entries']} entries / {v['pairs']} pairs" for k, v in at.items())
        + "; by modality " + ", ".join(f"{k} {v['pairs']}" for k, v in c["by_modality"].items()) + ".",
        "2. **False negatives.** Normalized equal to the chosen answer: "
        f"{_pct(fn['all']['strict_normalized_equal'])}; the same answer or the same yes/no: "
        f"{_pct(fn['all']['same_answer_or_same_yes_no'])} (closed: {_pct(fn.get('closed', {}).get('same_answer_or_same_yes_no'))}); "
        f"adding synonyms and truncations: {_pct(fn['all']['loose_incl_synonym_and_truncation'])}, "
        f"* {_ci(fn['all']['loose_incl_synonym_and_truncation'])}. "
        f"A right answer to another train row of the same question text: "
        f"{_pct(fn['all']['right_answer_to_same_question_text_in_train'])}, * "
        f"{_ci(fn['all']['right_answer_to_same_question_text_in_train'])} "
        f"(top-ranked pair only: {_pct(fn['top_ranked_only']['right_answer_to_same_question_text_in_train'])}).",
        "   Categories: " + "; ".join(f"{k} {v['count']}" for k, v in cats.items()) + ". MLPO's implicit terms "
        f"(dispreferred j raised over a lower-ranked m), {fn['implicit_terms']['terms']} in all: "
        + "; ".join(f"{k} {v['count']}" for k, v in fn["implicit_terms"]["by_classes"].items()) + ". Median SFT "
        "log-prob of the dispreferred answer by category: "
        + ", ".join(f"{k} {v['median']:.1f}" for k, v in fn["sft_logprob_by_category"].items()) + ".",
        f"3. **Replaced words.** Closed pairs that are a bare yes<->no flip: {_pct(rp['closed_yes_no_flip'])}; "
        f"any yes-word<->no-word flip: {_pct(rp['closed_polarity_flip_any_word'])}; the top-ranked closed pair is "
        f"the flip in {_pct(rp['closed_top_ranked_is_yes_no_flip'])}. Most frequent inserted tokens: "
        + ", ".join(f"{k!r} {v}" for k, v in list(rp.get("inserted_tokens", {}).items())[:10]) + ".",
        f"4. **Weights.** min {w['weights']['min']:.3f}, quartiles {w['weights']['q25']:.3f} / "
        f"{w['weights']['median']:.3f} / {w['weights']['q75']:.3f}, max {w['weights']['max']:.3f}, "
        f"std {w['weights']['std']:.3f}; {len(w['distinct_values'])} distinct values "
        f"({', '.join(f'{k}: {v}' for k, v in w['distinct_values'].items())}); at the low bound "
        f"{_pct(w.get('at_low_bound'))}, at the high bound {_pct(w.get('at_high_bound'))}. "
        "Mean weight by category: "
        + ", ".join(f"{k} {v['mean']:.2f} (n {v['n']})" for k, v in w["by_category"].items())
        + f". Score equals a number in the chosen or dispreferred text: "
        f"{_pct(w['score_equals_a_number_in_chosen_or_dispreferred'])}; score 0 where neither text "
        f"has a number: {_pct(w['score_zero_when_no_number_in_texts'])}.",
    ]
    tf = s["teacher_forced_on_pool"]
    line5 = ("5. **SFT already right?** Teacher-forced (sample's log-probs): the chosen answer beats every "
             "dispreferred answer in " + ", ".join(
                 f"{k} {_pct(v['chosen_beats_every_dispreferred'])}" for k, v in tf.items()) + ".")
    g = s.get("greedy_on_pool")
    if g:
        line5 += (" Greedy on the pool: right in " + ", ".join(
            f"{k} {_pct(g[k]['right'])}" for k in ("closed", "open", "all") if k in g)
            + f" (chosen = train majority: {_pct(g['truth_is_train_majority']['right'])}; not: "
            f"{_pct(g['truth_is_not_train_majority']['right'])}); it answers one of the entry's dispreferred "
            f"answers in {_pct(g['all']['answers_a_dispreferred'])}; where it is wrong, its answer is one of "
            f"them in {_pct(g['all']['wrong_answer_is_a_dispreferred'])}.")
    else:
        line5 += " Greedy answers on the pool: not measured."
    for name in ("sft", "aligned"):
        t = s.get(f"{name}_on_test")
        if t:
            line5 += (f" {name} on test: predicts the train majority answer in "
                      f"{_pct(t['all']['predicts_train_majority'])} (truth: {_pct(t['all']['truth_is_train_majority'])}).")
    lines.append(line5)
    cp = pr["contrast_pairs"]
    lines.append(
        f"6. **Prior.** Train majority share {_pct(pr['train_majority_share'])}; pool chosen answers that are "
        f"the majority {_pct(pr['pool_chosen_is_majority'])}; dispreferred that are the majority "
        f"{_pct(pr['pairs_dispreferred_is_majority'])}. Of {cp['pairs']} pairs whose dispreferred answer is "
        f"another right answer of the question text, {cp['toward_prior']} push toward the prior (chosen = "
        f"majority), {cp['away_from_prior']} away (dispreferred = majority), {cp['neither_is_majority']} neither: "
        f"away share {_pct(cp['away_share_of_directional'])}, p = {_p(cp['p_value_vs_half'])} against one half ("
        + ", ".join(f"{k}: {cp[k]['toward_prior']} toward, {cp[k]['away_from_prior']} away, p = "
                    f"{_p(cp[k]['p_value_vs_half'])}" for k in ("closed", "open") if k in cp) + "); "
        f"summed weight toward {cp['weight_toward']:.1f}, away {cp['weight_away']:.1f}.")
    return "\n".join(lines) + "\n"


def _ci(r: Mapping[str, Any]) -> str:
    ci = r.get("ci95_entries")
    return "n/a" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _p(p: float | None) -> str:
    return "n/a" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", type=Path, required=True, help="a workspace with every DVC output")
    parser.add_argument("--output", type=Path, required=True, help="the JSON report to write")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the numbers as Markdown")
    parser.add_argument("--no-generate", action="store_true",
                        help="skip the SFT model's greedy answers on the pool (no model is loaded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the entry bootstrap")
    args = parser.parse_args(argv)
    result = analyze(args.workspace, generate=not args.no_generate, seed=args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    if args.markdown is not None:
        command = "python scripts/analyze_pairs.py " + " ".join(sys.argv[1:] if argv is None else argv)
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(result, command))
    print(f"wrote {args.output}" + (f" and {args.markdown}" if args.markdown else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
