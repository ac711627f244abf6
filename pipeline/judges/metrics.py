"""The `score` stage report (`reports/score.json`): agreement, rounds, scores per judge, missing, cache.

Only what the inputs, params and cache determine is here; wall-clock times go to the stage's
`--timings` file (`score_timings`), so a rerun reproduces the report. A failed or interrupted run
writes a report too (`failed_metrics`, or the full report with `status: failed`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.judges.consensus import Outcome
from pipeline.judges.judge import JudgeStats
from pipeline.judges.panel import ScoreConfig
from pipeline.judges.parsing import SCORE_MAX, SCORE_MIN


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def score_metrics(
    outcomes: Sequence[Outcome],
    weights: Sequence[float],
    config: ScoreConfig,
    entries: int,
    unique: int,
    cache_stats: Mapping[str, JudgeStats],
    request_retries: Mapping[str, int],
) -> dict[str, Any]:
    """Everything `dvc metrics show` should tell about a scoring run.

    Counts are per dispreferred response (duplicates included), except `judges` (per judge turn
    actually taken), `missing.turns`/`malformed_answers` (likewise) and `cache` (per answer).
    """
    n = len(outcomes)
    rounds = Counter(o.rounds for o in outcomes)
    judges: dict[str, dict[str, Any]] = {}
    distinct = list({id(o): o for o in outcomes}.values())  # duplicates share one Outcome
    for judge in config.judges:
        turns = [t for o in distinct for t in o.turns if t.judge == judge.name]
        scores = [t.score for t in turns if t.score is not None]
        hist = Counter(scores)
        judges[judge.name] = {
            "turns": len(turns),
            "missing": sum(1 for t in turns if t.score is None),
            "malformed_answers": sum(len(t.errors) for t in turns),
            "mean_score": (sum(scores) / len(scores)) if scores else None,
            "score_histogram": {str(s): hist.get(s, 0) for s in range(SCORE_MIN, SCORE_MAX + 1)},
        }
    scored = [o.score for o in outcomes if o.score is not None]
    low, high = config.weights.clip
    return {
        "status": "ok",  # or "failed" (too many unscored responses: see `failure`)
        # not "error": `dvc metrics show` takes a top-level "error" key for a file it failed to read
        "failure": None,
        "entries": entries,
        "responses": n,
        "unique_responses": unique,  # distinct (question, reference, response): each judged once
        "agreement_rate": (sum(o.agreed for o in outcomes) / n) if n else None,
        "rounds_histogram": {str(r): rounds.get(r, 0) for r in range(1, config.rounds + 1)},
        "final_score": _summary(scored),
        "judges": judges,
        "missing": {
            "turns": sum(1 for o in distinct for t in o.turns if t.score is None),
            "unscored_responses": n - len(scored),  # weight mu: see pipeline/judges/weights.py
            "malformed_answers": sum(len(t.errors) for o in distinct for t in o.turns),
        },
        "weight": {
            **_summary(list(weights)),
            "clipped_low": sum(1 for w in weights if w <= low),
            "clipped_high": sum(1 for w in weights if w >= high),
        },
        "cache": cache_summary(cache_stats),
        "request_retries": dict(sorted(request_retries.items())),
    }


def cache_summary(cache_stats: Mapping[str, JudgeStats]) -> dict[str, Any]:
    hits = sum(s.hits for s in cache_stats.values())
    asked = sum(s.asked for s in cache_stats.values())
    return {
        "hits": hits,
        "asked": asked,
        "hit_rate": (hits / (hits + asked)) if hits + asked else None,
        "deduplicated": sum(s.deduplicated for s in cache_stats.values()),
    }


def failed_metrics(
    status: str,
    failure: str,
    entries: int,
    responses: int,
    unique: int,
    cache_stats: Mapping[str, JudgeStats],
    request_retries: Mapping[str, int],
) -> dict[str, Any]:
    """The report of a run that stopped before every response had a verdict (`status`: failed or
    interrupted): what is known, i.e. the sizes, the answers obtained and the retries."""
    return {
        "status": status,
        "failure": failure,
        "entries": entries,
        "responses": responses,
        "unique_responses": unique,
        "cache": cache_summary(cache_stats),
        "request_retries": dict(sorted(request_retries.items())),
    }


def score_timings(status: str, setup_seconds: float, seconds: float | None, asked: int) -> dict[str, Any]:
    """The `--timings` file: wall-clock values, which differ on every run (an uncached DVC output)."""
    return {
        "status": status,
        "setup_seconds": round(setup_seconds, 3),  # loading local judges, remote preflights
        "seconds": None if seconds is None else round(seconds, 3),  # judging
        "asked": asked,
        "seconds_per_asked_answer": (seconds / asked) if seconds is not None and asked else None,
    }
