"""Ranked rows in, scored rows out: the library half of the `score` stage.

Every dispreferred response of the dataset (each entry's `rejected` list, flattened) is judged by
the panel (`consensus.run_consensus`), the final scores are turned into weights over the whole
dataset (`weights.clinical_weights`), and each row gets a `judgements` list aligned with its
`rejected` list. With `score.rationales.enabled`, one judge then writes the rationales
(`rationales.add_rationales`); otherwise the rows' `rationale` and `counterfactuals` are null.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.judges.cache import ResponseCache
from pipeline.judges.consensus import Outcome, PanelJudge, run_consensus
from pipeline.judges.judge import CachedJudge, build_judges
from pipeline.judges.metrics import cache_summary, failed_metrics, score_metrics, score_timings
from pipeline.judges.panel import PanelConfigError, ScoreConfig
from pipeline.judges.prompts import Case, PromptSet, load_prompts
from pipeline.judges.rationales import RationaleResult, add_rationales, disabled_metrics, rationale_judge
from pipeline.judges.weights import clinical_weights, visual_weights
from pipeline.schema import question_in_context


def check_panel(config: ScoreConfig, prompts: PromptSet) -> None:
    """Fail before any judging if the panel and the prompt file do not fit together."""
    for judge in config.judges:
        if judge.role not in prompts.roles:
            raise PanelConfigError(
                f"judge {judge.name}: role {judge.role!r} is not in {prompts.path} (roles: {sorted(prompts.roles)})"
            )
        if getattr(judge, "prefill", False) and not prompts.prefill:
            raise PanelConfigError(f"judge {judge.name}: prefill is on but {prompts.path} has no `prefill` text")
    if config.rationales.enabled and prompts.rationales is None:
        raise PanelConfigError(
            f"score.rationales.enabled is true but {prompts.path} has no `rationales:` section (see "
            f"pipeline/judges/prompts.yaml)"
        )


def cases_from_rows(rows: Sequence[dict]) -> tuple[list[Case], list[tuple[int, int]]]:
    """Flatten the dispreferred responses; also return (row index, position in `rejected`) of each."""
    cases, where = [], []
    for r, row in enumerate(rows):
        for j, rejected in enumerate(row["rejected"] or []):
            cases.append(Case(question=question_in_context(row["question"], row.get("context") or []),
                              reference=row["answer"], response=rejected["text"]))
            where.append((r, j))
    return cases, where


@dataclass
class ScoringResult:
    rows: list[dict]  # SCORED_SCHEMA rows
    outcomes: list[Outcome]  # one per dispreferred response, in flattened order (shared by duplicates)
    weights: list[float]
    unique: int  # distinct (question, reference, response) triples judged


def score_rows(
    rows: Sequence[dict],
    judges: Sequence[PanelJudge],
    prompts: PromptSet,
    config: ScoreConfig,
    on_ask: Callable[[int, str, int, int], None] | None = None,
) -> ScoringResult:
    """Judge every dispreferred response of `rows` (RANKED_SCHEMA) and attach the judgements."""
    cases, where = cases_from_rows(rows)
    # The judges see text only (MMedPO §3.2.1: no image), so entries sharing question, reference and
    # response get one verdict; templated datasets repeat such triples a lot.
    unique = list(dict.fromkeys(cases))
    verdicts = run_consensus(unique, judges, prompts, rounds=config.rounds, retries=config.retries, on_ask=on_ask)
    by_case = dict(zip(unique, verdicts, strict=True))
    outcomes = [by_case[c] for c in cases]
    weights = clinical_weights([o.score for o in outcomes], config.weights)
    judgements: list[list[dict]] = [[] for _ in rows]
    for (r, _j), outcome, weight in zip(where, outcomes, weights, strict=True):
        judgements[r].append(
            {"score": outcome.score, "rounds": outcome.rounds, "agreed": outcome.agreed, "weight": weight,
             "transcript": outcome.transcript()}
        )
    # No rationales yet (null columns): `add_rationales` fills them in when score.rationales is on.
    scored = [{**row, "judgements": judgements[r], "rationale": None, "counterfactuals": None}
              for r, row in enumerate(rows)]
    return ScoringResult(rows=scored, outcomes=outcomes, weights=weights, unique=len(unique))


class TooManyUnscored(PipelineError):
    """More dispreferred responses ended without any valid score than `score.max_unscored` allows."""


def check_unscored(result: ScoringResult, config: ScoreConfig) -> str | None:
    """The failure message if the share of unscored responses exceeds `config.max_unscored`, else None."""
    n = len(result.outcomes)
    unscored = sum(1 for o in result.outcomes if o.score is None)
    if not n or unscored / n <= config.max_unscored:
        return None
    example = next(((t.judge, t.answers[0], t.errors[0]) for o in result.outcomes for t in o.turns if t.errors),
                   None)
    shown = ""
    if example:
        answer = " ".join(example[1].split())
        answer = answer if len(answer) <= 120 else answer[:120] + "…"
        shown = f"; e.g. judge {example[0]} answered {answer!r} ({example[2]})"
    return (
        f"{unscored} of {n} dispreferred responses ({unscored / n:.1%}) got no valid score from any judge, more "
        f"than score.max_unscored ({config.max_unscored:.1%}){shown}. The judges do not answer in the JSON "
        f"format: constrain them (openai: `structured_output`; hf: `prefill`), use a stronger model, or raise "
        f"score.max_unscored"
    )


def score_panel(
    config: ScoreConfig,
    rows: Sequence[dict],
    cache_path: str | Path,
    progress: bool = True,
    on_failure: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> tuple[list[dict], dict[str, Any], dict[str, Any]]:
    """The whole stage without its file I/O: judge every dispreferred response of `rows`
    (RANKED_SCHEMA) through the response cache at `cache_path`, then, with `score.rationales`
    on, ask for the rationales; return SCORED_SCHEMA rows, the stage metrics and the timings
    (wall-clock values and cache use, kept out of the metrics).

    Every answer is in the cache the moment it arrives, so an interrupted run loses no judge
    answer and a restart asks only what is missing. If the run fails once the panel is being built
    (a judge error, a preflight, Ctrl-C, too many unscored responses: `score.max_unscored`),
    `on_failure(metrics, timings)` gets the report of what is known before the error propagates.
    """
    from tqdm import tqdm

    prompts = load_prompts(config.prompts)
    check_panel(config, prompts)
    cases, _ = cases_from_rows(rows)
    sizes = {"entries": len(rows), "responses": len(cases), "unique": len(set(cases))}
    start = time.perf_counter()
    judging: float | None = None  # when judging started (after loading and preflights)
    writing: float | None = None  # when the rationales started
    judges: list[CachedJudge] = []
    writer: CachedJudge | None = None  # the judge that writes the rationales

    def retries() -> Counter[str]:
        total: Counter[str] = Counter()
        for judge in judges:
            total.update(getattr(judge.backend, "retries", {}))  # only the openai backend retries requests
        return total

    def timings(status: str) -> dict[str, Any]:
        now = time.perf_counter()
        setup = (judging if judging is not None else now) - start
        end = writing if writing is not None else now
        out = score_timings(status, setup, None if judging is None else end - judging,
                            sum(j.stats.asked for j in judges))
        if config.rationales.enabled:  # cache use depends on earlier runs: here, not in the report
            out["rationale_seconds"] = None if writing is None else round(now - writing, 3)
            out["rationale_cache"] = None if writer is None else cache_summary({writer.name: writer.stats})
        return out

    rationales: RationaleResult | None = None
    try:
        with ResponseCache(cache_path) as cache:
            judges = build_judges(config.judges, cache, prompts.version, config.request_retry)
            judging = time.perf_counter()  # judging only, not model loading or preflights
            bar = tqdm(total=0, unit="answer", desc="score", disable=not progress, dynamic_ncols=True)

            def on_ask(rnd: int, name: str, attempt: int, n: int) -> None:
                retry = f" retry {attempt}" if attempt else ""
                bar.set_description(f"score round {rnd} {name}{retry}")
                bar.total += n
                bar.refresh()

            for judge in judges:
                judge.on_answer = bar.update
            try:
                result = score_rows(rows, judges, prompts, config, on_ask=on_ask)
                if config.rationales.enabled and prompts.rationales is not None \
                        and check_unscored(result, config) is None:
                    writing = time.perf_counter()
                    panel_judge = next(j for j in judges if j.name == config.rationales.judge)
                    writer = rationale_judge(panel_judge, cache, prompts.rationales, config.rationales)
                    writer.on_answer = bar.update
                    bar.set_description(f"score rationales {writer.name}")
                    bar.total += len(rows) + len(cases)
                    bar.refresh()
                    rationales = add_rationales(result.rows, writer, prompts.rationales)
            finally:
                bar.close()
    except (PipelineError, KeyboardInterrupt) as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        if on_failure is not None:
            on_failure(failed_metrics(status, str(err) or "interrupted", sizes["entries"], sizes["responses"],
                                      sizes["unique"], {j.name: j.stats for j in judges}, retries()),
                       timings(status))
        raise
    metrics = score_metrics(
        result.outcomes, result.weights, config, entries=len(rows), unique=result.unique,
        cache_stats={j.name: j.stats for j in judges}, request_retries=retries(),
    )
    if rationales is not None:
        metrics["rationales"] = rationales.metrics
    else:  # off, or not asked because the judging failed (below)
        metrics["rationales"] = {"enabled": True, "skipped": "the judging failed"} if config.rationales.enabled \
            else disabled_metrics()
    failure = check_unscored(result, config)
    if failure is not None:
        metrics.update(status="failed", failure=failure)
        if on_failure is not None:
            on_failure(metrics, timings("failed"))
        raise TooManyUnscored(failure)
    scored = rationales.rows if rationales is not None else result.rows
    scored, metrics["visual_dispreferred"] = visual_weights(scored, config.weights)
    return scored, metrics, timings("ok")
