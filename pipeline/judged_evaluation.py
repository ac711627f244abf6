"""LLM-judged evaluation of free-text answers on LLaVA-Med's relative-score protocol (HSCR Table 2).

LLaVA-Med (`llava/eval/eval_multimodal_chat_gpt_score.py`, `summarize_gpt_review.py`) shows a
text-only judge (GPT-4 there) the question, what is known about the image, and two answers:
Assistant 1 is the reference answer, Assistant 2 the model's. The judge rates each from 1 to 10
on the first line of its reply ("8 6") and explains after it. The reported number is the
**relative score**: the mean over items of `model score / reference score`, × 100; so 100 means
"as good as the reference", and the ratio is taken per item before averaging (not the ratio of
the means), as `summarize_gpt_review.py` does.

Here the judge is any judge of the panel's kinds (`hf` local or `openai`-compatible), behind the
same persistent response cache (`pipeline.judges.cache`), with the same retries; the prompt
texts live in a versioned prompts file (`pipeline/judges/eval_prompts.yaml` by default) whose
version is part of every cache key. A reply whose first line does not hold two scores in 1..10
is re-asked with the reason appended (`retries` times), then the item is recorded as unscored,
never guessed. Every item keeps its transcript: the messages sent and every raw reply.

Generated reports (the report-generation benchmarks' `reports/report_predictions/<model>.parquet`)
are judged the same way when `answer_types` names `report`: the instruction is the question, the
reference report is Assistant 1 and the generated report Assistant 2 (`report_rows`).

The judge never sees the image (as in LLaVA-Med, where GPT-4 reads a caption instead); the
item's `about_image` text (a caption where the dataset has one, else the image's modality)
stands in for it. See docs/evaluation.md § "LLM-judged evaluation".
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from pydantic import Field, model_validator

from pipeline.errors import DataError
from pipeline.judges.judge import CachedJudge, JudgeRequest
from pipeline.judges.panel import JudgeConfig, NonEmpty, RequestRetry
from pipeline.judges.prompts import (
    PromptFileError,
    check_keys,
    check_roles,
    check_templates,
    check_texts,
    check_version,
    read_prompt_file,
)
from pipeline.params import Config
from pipeline.schema import Turn, question_in_context

SCORE_MIN, SCORE_MAX = 1.0, 10.0
REPORT_ANSWER_TYPE = "report"  # the answer type generated reports are judged under
_NUMBER = r"(10(?:\.0+)?|[1-9](?:\.\d+)?)"
# The first line is exactly two scores, as LLaVA-Med's summarize_gpt_review.py reads it
# (`split(' ')` of that line); a comma or slash between them is accepted too. Anything else
# ("Assistant 1: 8, Assistant 2: 6") is re-asked rather than guessed at.
_PAIR = re.compile(rf"^{_NUMBER}\s*[\s,/]\s*{_NUMBER}\.?$")

_TURN_FIELDS = {"question", "about_image", "reference", "answer"}
_REQUIRED = {  # template: (placeholders it must use, placeholders it may use)
    "turn": ({"question", "reference", "answer"}, _TURN_FIELDS),
    "retry_turn": (set(), {"error"}),
}


class JudgedEvalConfig(Config):
    """The `judged_eval:` section: an LLM judge scores free-text answers against the references
    (LLaVA-Med's relative score, HSCR Table 2; docs/evaluation.md)."""

    enabled: bool = Field(description="run the judge; false writes `{enabled: false}` and no transcripts "
                          "(a 135M judge on one-word phantom answers measures little: off by default)")
    answer_types: tuple[NonEmpty, ...] = Field(strict=False, min_length=1,
                                               description="the answer types judged (e.g. [open]); closed yes/no "
                                               "answers are scored exactly and need no judge; `report` judges the "
                                               "generated reports of the report-generation benchmarks")
    max_items: int | None = Field(ge=1, description="per model and answer type, a seeded sample of this many "
                                  "items of that type, the same items for every model; null = all")
    seed: int = Field(ge=0, description="seeds the item sample")
    retries: int = Field(ge=0, description="re-asks after a reply whose first line is not two scores, then the "
                         "item is unscored")
    judge: JudgeConfig = Field(description="the judge, as one judge of score.judges (hf local or openai); its "
                               "`role` is a key of `roles:` in the prompts file")
    prompts: NonEmpty = Field(description="the versioned prompts file (a dep of the stage)")
    request_retry: RequestRetry = Field(description="HTTP retries of the openai backend")

    @model_validator(mode="after")
    def _no_prefill(self) -> JudgedEvalConfig:
        if getattr(self.judge, "prefill", False):
            raise ValueError("judge.prefill must be false: the judged-evaluation prompts have no prefill text "
                             "(the reply's first line is read as written)")
        return self


class MalformedScores(ValueError):
    """A reply whose first line is not two scores in [1, 10]."""


@dataclass(frozen=True)
class JudgedEvalPrompts:
    """The judge's texts: a system prompt, the per-item turn, and the re-ask after a malformed reply."""

    version: str
    roles: dict[str, str]  # role -> system prompt
    turn: Template
    retry_turn: Template

    def request(self, item: JudgedItemInput, role: str) -> JudgeRequest:
        if role not in self.roles:
            raise PromptFileError(f"the judged-evaluation prompts have no role {role!r} (roles: {sorted(self.roles)})")
        user = self.turn.substitute(question=item.question, about_image=item.about_image or "(nothing)",
                                    reference=item.reference, answer=item.answer)
        return JudgeRequest(messages=(("system", self.roles[role]), ("user", user)))

    def retry(self, request: JudgeRequest, reply: str, error: str) -> JudgeRequest:
        """The same conversation, the malformed reply as the assistant's turn, then the reason."""
        return JudgeRequest(messages=(*request.messages, ("assistant", reply),
                                      ("user", self.retry_turn.substitute(error=error))))


def load_judged_eval_prompts(path: str | Path) -> JudgedEvalPrompts:
    """Read and check the prompts file (a missing key or an unknown placeholder is an error naming it)."""
    where = str(path)
    raw = read_prompt_file(path, "judged_eval.prompts")
    check_keys(raw, {"version", "roles", *_REQUIRED}, where)
    roles = check_roles(raw, where)
    check_texts(raw, list(_REQUIRED), where)
    version = check_version(raw, where)
    templates = check_templates(raw, _REQUIRED, where)
    return JudgedEvalPrompts(version=version, roles={k: v.strip() for k, v in roles.items()}, turn=templates["turn"],
                             retry_turn=templates["retry_turn"])


def parse_scores(reply: str) -> tuple[float, float]:
    """(reference score, model score) from the reply's first non-empty line, or `MalformedScores`."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    if not lines:
        raise MalformedScores("the reply is empty")
    match = _PAIR.match(lines[0])
    if match is None:
        raise MalformedScores(f"the first line {lines[0][:80]!r} is not two scores from 1 to 10 (e.g. \"8 6\")")
    first, second = float(match.group(1)), float(match.group(2))
    return first, second


@dataclass(frozen=True)
class JudgedItemInput:
    """One answer to judge against its reference."""

    id: str
    question: str
    about_image: str  # what the judge is told about the image (a caption where the data has one, else its modality)
    reference: str  # Assistant 1: the reference answer
    answer: str  # Assistant 2: the model's answer
    groups: dict[str, str] = field(default_factory=dict)  # e.g. {"answer_type": "open", "modality": "CT"}


@dataclass
class JudgedItem:
    """The verdict on one item: the two scores (None when every reply was malformed or failed)."""

    id: str
    groups: dict[str, str]
    reference_score: float | None
    model_score: float | None
    failure: str | None  # why it is unscored: malformed (every try) | backend (no reply)
    transcript: list[dict[str, Any]]  # each try: the messages sent and the raw reply (None if none came)

    @property
    def scored(self) -> bool:
        return self.reference_score is not None and self.model_score is not None

    def as_row(self) -> dict[str, Any]:
        return {"id": self.id, **self.groups, "reference_score": self.reference_score,
                "model_score": self.model_score, "failure": self.failure, "transcript": self.transcript}


def judge_answers(judge: CachedJudge, prompts: JudgedEvalPrompts, items: Sequence[JudgedItemInput],
                  retries: int) -> list[JudgedItem]:
    """Ask `judge` to score every item, re-asking malformed replies up to `retries` times, all items
    of one try in one batch (the backend batches or runs them concurrently)."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    requests = {i: prompts.request(item, judge.role) for i, item in enumerate(items)}
    transcripts: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(items))}
    scores: dict[int, tuple[float, float]] = {}
    failures: dict[int, str] = {}
    for attempt in range(retries + 1):
        pending = sorted(requests)
        if not pending:
            break
        replies, _ = judge.ask_each([requests[i] for i in pending])
        following: dict[int, JudgeRequest] = {}
        for i, reply in zip(pending, replies, strict=True):
            transcripts[i].append({"messages": requests[i].as_dicts(), "reply": reply})
            if reply is None:
                failures[i] = "backend"  # not cached: a rerun asks again
                continue
            try:
                scores[i] = parse_scores(reply)
                failures.pop(i, None)
            except MalformedScores as bad:
                failures[i] = "malformed"
                if attempt < retries:
                    following[i] = prompts.retry(requests[i], reply, str(bad))
        requests = following
    out = []
    for i, item in enumerate(items):
        pair = scores.get(i)
        out.append(JudgedItem(id=item.id, groups=dict(item.groups),
                              reference_score=pair[0] if pair else None, model_score=pair[1] if pair else None,
                              failure=None if pair else failures.get(i, "malformed"), transcript=transcripts[i]))
    return out


def summarize(items: Sequence[JudgedItem]) -> dict[str, Any]:
    """LLaVA-Med's summary: per group value (and `overall`) the mean reference score, the mean model
    score and the relative score 100 × mean(model / reference), over the scored items; with counts."""

    def block(chosen: list[JudgedItem]) -> dict[str, Any]:
        scored = [j for j in chosen if j.scored]
        n = len(scored)
        mean = (lambda values: sum(values) / n) if n else (lambda values: None)
        return {
            "items": len(chosen),
            "scored": n,
            "unscored": len(chosen) - n,
            "reference_score": mean([j.reference_score for j in scored]),
            "model_score": mean([j.model_score for j in scored]),
            "relative_score": (100.0 * mean([j.model_score / j.reference_score for j in scored])) if n else None,
        }

    summary: dict[str, Any] = {"overall": block(list(items))}
    by_key: dict[str, dict[str, list[JudgedItem]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        for key, value in item.groups.items():
            by_key[key][value].append(item)
    for key in sorted(by_key):
        summary[key] = {value: block(chosen) for value, chosen in sorted(by_key[key].items())}
    failures: dict[str, int] = defaultdict(int)
    for item in items:
        if item.failure:
            failures[item.failure] += 1
    summary["unscored_by_cause"] = {cause: failures.get(cause, 0) for cause in ("malformed", "backend")}
    return summary


def select_ids(rows: Sequence[dict[str, Any]], answer_types: Sequence[str], max_items: int | None,
               seed: int) -> list[str]:
    """The ids judged, sorted: per answer type of `answer_types`, its ids, or a seeded sample of
    `max_items` of them (each type sampled on its own, so a rare type is not crowded out)."""
    ids: list[str] = []
    for answer_type in sorted(set(answer_types)):
        of_type = sorted(row["id"] for row in rows if row["answer_type"] == answer_type)
        if max_items is not None and len(of_type) > max_items:
            of_type = random.Random(seed).sample(of_type, max_items)
        ids.extend(of_type)
    return sorted(ids)


def report_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Report-generation predictions (`REPORT_PREDICTION_SCHEMA` rows) as prediction rows of answer
    type `report`: the instruction is the question, the reference report the answer."""
    return [{"id": row["id"], "question": row["prompt"] or "", "answer": row["report"] or "",
             "prediction": row["prediction"] or "", "answer_type": REPORT_ANSWER_TYPE,
             "modality": row["modality"] or "unknown"} for row in rows]


def item_input(row: dict[str, Any], context: Sequence[Turn] = ()) -> JudgedItemInput:
    """A prediction row (reports/predictions/<model>.parquet) as an item for the judge; `context`
    is its test entry's earlier turns, which the judge reads before the question."""
    return JudgedItemInput(id=row["id"], question=question_in_context(row["question"], context),
                           about_image=f"a {row['modality']} image",
                           reference=row["answer"], answer=row["prediction"],
                           groups={"answer_type": row["answer_type"], "modality": row["modality"]})


def evaluate_models(judge: CachedJudge, prompts: JudgedEvalPrompts, config: JudgedEvalConfig,
                    predictions: dict[str, Sequence[dict[str, Any]]],
                    contexts: Mapping[str, Sequence[Turn]] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Judge every model's answers on the same items: (metrics, one transcript row per model and item).

    The items are chosen from the first model's predictions; every other model must have answered
    each of them (a clear error otherwise), so the relative scores are paired. `contexts` maps a
    test entry's id to its earlier turns (the prediction files carry none; absent ids: none)."""
    contexts = contexts or {}
    if not predictions:
        raise ValueError("no model to judge")
    first = next(iter(predictions))
    present = {row["answer_type"] for row in predictions[first]}
    absent = [answer_type for answer_type in config.answer_types if answer_type not in present]
    if absent:
        hint = (" (`report` needs a report-generation benchmark: prepare.phantom.n_report or "
                "prepare.files.report)" if REPORT_ANSWER_TYPE in absent else "")
        raise DataError(f"judged_eval: no item of answer type(s) {absent} in the predictions of {first!r} "
                        f"(it has {sorted(present)}); check judged_eval.answer_types{hint}")
    ids = select_ids(predictions[first], config.answer_types, config.max_items, config.seed)
    metrics: dict[str, Any] = {"enabled": True, "judge": judge.backend.identity() | {"name": judge.name},
                               "prompt_version": prompts.version, "answer_types": list(config.answer_types),
                               "items": len(ids), "models": {}}
    transcripts: list[dict[str, Any]] = []
    for model, rows in predictions.items():
        by_id = {row["id"]: row for row in rows}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"judged_eval: model {model!r} has no prediction for {len(missing)} judged item(s), "
                            f"e.g. {missing[:3]}; evaluate every model on the same test split")
        chosen = [by_id[i] for i in ids]
        judged = judge_answers(judge, prompts, [item_input(row, contexts.get(row["id"], ())) for row in chosen],
                               config.retries)
        metrics["models"][model] = summarize(judged)
        for row, verdict in zip(chosen, judged, strict=True):
            transcripts.append({"model": model, "question": row["question"], "reference": row["answer"],
                                "answer": row["prediction"], **verdict.as_row()})
    return metrics, transcripts


def disabled_metrics() -> dict[str, Any]:
    """reports/judged_eval.json when `judged_eval.enabled` is false."""
    return {"enabled": False}


__all__ = [
    "REPORT_ANSWER_TYPE",
    "JudgedEvalConfig",
    "JudgedEvalPrompts",
    "JudgedItem",
    "JudgedItemInput",
    "MalformedScores",
    "disabled_metrics",
    "evaluate_models",
    "item_input",
    "judge_answers",
    "load_judged_eval_prompts",
    "parse_scores",
    "report_rows",
    "select_ids",
    "summarize",
]
