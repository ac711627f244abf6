"""CheXPO counterfactual rationales (`score.rationales`): text that argues for each answer of a pair.

After the panel has judged every dispreferred response, one judge of the panel (`score.rationales.judge`:
its backend, its loaded model or endpoint, its temperature, the shared response cache and, for
`openai`, its retries) is asked for

- a **rationale** per entry: why the chosen answer is right for the question, and
- a **counterfactual rationale** per dispreferred response: an argument for that wrong answer.

The judge sees text only (question and answers), never the image, as for the verdicts; so entries
that share the question and the answer share their rationale, and identical requests are asked
once (the cache and `CachedJudge`'s batch deduplication see to it). All requests go to the
backend in one call: `hf` generates them in `batch_size` batches with a shared system prefix,
`openai` runs them `max_concurrency` at a time.

Nothing is invented. A request the backend fails on (an HTTP 400, retries exhausted, a stopped
turn) and an answer that is empty or not a sentence of prose leave the response without a
rationale (null) and are counted by cause in the stage report; failed requests are not cached, so
a rerun asks them again, while empty and malformed answers are what the judge said and are.
Each written text carries its provenance: the judge, the prompt version and the cache key under
which the answer is stored. See docs/judges.md § "Counterfactual rationales (CheXPO)".
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipeline.judges.cache import ResponseCache
from pipeline.judges.judge import CachedJudge, JudgeRequest
from pipeline.judges.panel import RationaleConfig
from pipeline.judges.prompts import RationalePrompts
from pipeline.schema import question_in_context

MIN_WORDS = 3  # the judge's own words (after any prefill) a rationale must have
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_WORD = re.compile(r"[^\W_]+")


class MalformedRationale(ValueError):
    """An answer that is not a usable rationale; `cause` is `empty` or `malformed`."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


def clean_rationale(answer: str, start: str) -> str:
    """The rationale in a judge's answer (`start`, the request's prefill, + its continuation), or
    `MalformedRationale`.

    Kept: the first paragraph (up to a blank line), whitespace collapsed, cut after its first
    complete sentence when it has one: the prompt asks for one short sentence, and what a small
    judge adds after it is more of the same at a training cost (every extra token is trained on
    both sides of every pair); a text cut short by `max_new_tokens` loses its fragment.
    Rejected: nothing of the judge's own (empty), fewer than `MIN_WORDS` words of its own, or a
    JSON object or code block instead of prose (malformed). Nothing is added to what it said.
    """
    if not answer.startswith(start):
        raise ValueError("the answer does not start with its prefill")
    own = answer[len(start):]
    if not own.strip():
        raise MalformedRationale("empty", "empty answer")
    text = re.split(r"\n\s*\n", (start + own).strip())[0]
    text = " ".join(text.split())
    begin = len(" ".join(start.split()))  # where the judge's own words begin in `text`
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() > begin]
    if ends:
        text = text[: ends[0]]
    if text.lstrip().startswith(("{", "[", "```")):
        raise MalformedRationale("malformed", "a JSON object or code block, not a sentence")
    words = len(_WORD.findall(text[begin:]))
    if words < MIN_WORDS:
        raise MalformedRationale("malformed", f"{words} word(s) of its own, fewer than {MIN_WORDS}")
    return text


@dataclass
class RationaleResult:
    rows: list[dict]  # the input rows with `rationale` and `counterfactuals` filled in
    metrics: dict[str, Any]  # `rationales` of reports/score.json
    judge: CachedJudge  # its `stats` are this run's cache use (the timings file)


def rationale_judge(judge: CachedJudge, cache: ResponseCache, prompts: RationalePrompts,
                    config: RationaleConfig) -> CachedJudge:
    """The panel judge `judge` as a rationale writer: same config, backend and cache; its own
    decoding (`max_new_tokens`; no structured output: the answer is prose), its own prompt version
    in the cache key, and its own counts."""
    decoding = replace(judge.generation, max_new_tokens=config.max_new_tokens, structured_output="none")
    return CachedJudge(config=judge.config, backend=judge.backend, cache=cache,
                       prompt_version={"rationales": prompts.version}, decoding=decoding)


def add_rationales(rows: Sequence[dict], judge: CachedJudge, prompts: RationalePrompts) -> RationaleResult:
    """Ask `judge` (from `rationale_judge`) for every entry's rationale and every dispreferred
    response's counterfactual; return the rows with `rationale` (a provenance struct or None) and
    `counterfactuals` (one per `rejected`, each a struct or None) and the counts."""
    requests: list[JudgeRequest] = []
    where: list[tuple[int, int | None]] = []  # (row, None) = its rationale; (row, j) = counterfactual j
    for r, row in enumerate(rows):
        question = question_in_context(row["question"], row.get("context") or [])
        requests.append(prompts.rationale(question, row["answer"], judge.prefill))
        where.append((r, None))
        for j, rejected in enumerate(row["rejected"] or []):
            requests.append(prompts.counterfactual(question, rejected["text"], row["answer"], judge.prefill))
            where.append((r, j))
    answers, error = judge.ask_each(requests) if requests else ([], None)
    keys = [judge.key(r) for r in requests]

    out = [{**row, "rationale": None, "counterfactuals": [None] * len(row["rejected"] or [])} for row in rows]
    requested: Counter[str] = Counter()
    written: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    for (r, j), request, key, answer in zip(where, requests, keys, answers, strict=True):
        kind = "rationale" if j is None else "counterfactual"
        requested[kind] += 1
        if answer is None:
            causes["backend"] += 1
            continue
        try:
            text = clean_rationale(answer, request.prefill)
        except MalformedRationale as bad:
            causes[bad.cause] += 1
            continue
        value = {"text": text, "judge": judge.name, "prompt_version": prompts.version, "cache_key": key}
        if j is None:
            out[r]["rationale"] = value
        else:
            out[r]["counterfactuals"][j] = value
        written[kind] += 1
    metrics = {
        "enabled": True,
        "judge": judge.name,
        "prompt_version": prompts.version,
        "unique_requests": len(set(keys)),  # entries sharing question and answer share a request
        **{kind: {"requested": requested[kind], "written": written[kind], "failed": requested[kind] - written[kind]}
           for kind in ("rationale", "counterfactual")},
        # per request above, duplicates included: backend (no answer: not cached, a rerun asks again),
        # empty, malformed (cached: what the judge said)
        "failed_by_cause": {cause: causes[cause] for cause in ("backend", "empty", "malformed")},
        "backend_error": error,  # the backend's first error message, if any
    }
    return RationaleResult(rows=out, metrics=metrics, judge=judge)


def disabled_metrics() -> dict[str, Any]:
    """`rationales` of reports/score.json when `score.rationales.enabled` is false."""
    return {"enabled": False}
