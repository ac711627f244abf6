"""Dispreferred answers written by another model (`sample.source: external`; HSCR Table 3's baseline).

HSCR §5 compares its self-generated dispreferred answers with ones written by a stronger model
(GPT-4o). With `sample.source: external` the `sample` stage builds that baseline: for each pool
entry one request asks a second model, the *writer*, for `sample.k` distinct answers to the
question that are plausible but WRONG, showing it the correct answer so it knows what to avoid.
Everything after `sample` (rerank, score, train) reads the same CANDIDATES_SCHEMA rows and runs
unchanged. Decisions (docs/sampling.md § "Dispreferred answers from another model"):

- **The writer is a judge backend.** `sample.external.writer` is a judge config of the `score`
  panel (`pipeline.judges.panel.HFJudgeConfig` or `OpenAIJudgeConfig`, told apart by `backend`),
  built by `pipeline.judges.judge.build_judges`: the same local-model loading, OpenAI client,
  preflight, retries (`sample.external.request_retry`), circuit breaker, API-key handling
  (`api_key_env`) and SQLite response cache (`--cache`), as `pipeline.judges.rationales` reuses a
  judge as a text writer. Its own prompt file (`sample.external.prompts`, versioned; the version is
  in every cache key) picks the system message by the writer's `role`, and hf writers with
  `prefill: true` continue the file's `prefill` ("1."), which pins the list format.
  The packaged default (hf, `smollm2`) runs offline, and **writes blind**: the hf backend is
  text-only, so it sees the question and the correct answer, never the image; its answers come
  from the language prior alone. `send_image: true` (openai writers only; rejected with an hf
  writer) sends the image along as a base64 data-URL image part of the user message, as GPT-4o
  saw it in the paper.
- **Parsing.** The answer (prefill + continuation) is read as a JSON list of strings when it is
  one (`["a", "b"]`, optionally in a code fence), else as a numbered or bulleted list, one answer
  per line (`1. a`, `2) b`, `(3) c`, `- d`); other lines are ignored. Each item is cleaned (markdown
  emphasis, surrounding quotes, trailing `.,;:` and extra whitespace removed; nothing else is
  changed) and rejected when it is empty after `pipeline.metrics.normalize_answer`, equal to the
  correct answer after it, or a duplicate of an earlier item after it; for a closed question also
  when the evaluation would score it correct (`pipeline.metrics.closed_correct`: "No, there is no
  mass" for the answer "no", which small writers produce often). The first `k` usable items
  are kept in the order written; usable items past k are counted (`beyond_k`), not kept. Fewer
  than k is allowed and counted.
- **Nothing is invented.** A request the backend fails on (an HTTP 400, retries exhausted, a
  stopped turn), an empty answer, an answer without a list, and a list whose every item is
  rejected leave the entry with no candidates, counted by cause. Failed requests are not cached,
  so a rerun asks them again; empty and malformed answers are what the writer said and are
  cached. If more than a share `sample.external.max_failed` of the entries end without a
  candidate, the stage fails (`DataError`) after writing its report.
- **Fields that only make sense for self-sampling** get the values that keep every consumer's
  meaning: `chosen_token_ids` and each candidate's `token_ids` are the SFT model's tokenization
  (`VLM.answer_ids`, end-of-turn included); `chosen_logprob` and each candidate's `logprob` are
  log p_sft(answer | full image, question) from `pipeline.self_contrast.score_candidates`, the
  same scorer self-sampling uses (so rerank's tie-breaks and the stage's log-prob metrics mean
  the same); `sensitivity`, `positions`, `original_tokens`, `replacement_tokens` are empty lists
  (no position was replaced); `level` is 1..n, the order in which the writer listed the kept
  answers (n <= k).
- **Resumable in two layers.** Every answer is in the response cache the moment it arrives (a
  killed run asks only what is missing); the SFT-model scoring then runs in `sample.batch_size`
  batches kept under `--work-dir` (`pipeline.resume`), keyed by the inputs' content, the config,
  this code's version, the library versions and a digest of every entry's parsed answers, so a
  rerun whose answers changed (a failed request answered now) never reuses stale parts.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, model_validator

from pipeline.errors import DataError
from pipeline.judges.judge import CachedJudge, JudgeRequest
from pipeline.judges.panel import JudgeConfig, RequestRetry
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
from pipeline.schema import VQA_NAMES, question_in_context

if TYPE_CHECKING:
    from pipeline.models.vlm import VLM
    from pipeline.resume import BatchRun
    from pipeline.self_contrast import SampleConfig

NonEmpty = Annotated[str, Field(min_length=1, pattern=r"\S")]


class ExternalSourceConfig(Config):
    """`sample.external`: the model that writes wrong answers when `sample.source` is external (HSCR Table 3)."""

    writer: JudgeConfig = Field(
        description="the writer: a judge config as in score.judges (backend hf: a local causal LM, text only; "
        "backend openai: any OpenAI-compatible endpoint); its `role` picks the system prompt of `prompts`"
    )
    send_image: bool = Field(
        description="send the image with each request (a base64 data-URL image part); openai writers only, "
        "an hf writer is text-only and writes blind"
    )
    max_failed: float = Field(
        ge=0.0, le=1.0,
        description="largest share of entries that may end without any candidate (failed request, empty or "
        "unreadable answer, every item rejected); more fails the stage after writing its report; 1 never fails",
    )
    prompts: NonEmpty = Field(description="the versioned prompts file of the writer (a dep of the sample stage)")
    request_retry: RequestRetry = Field(description="HTTP retries and circuit breaker of an openai writer")

    @model_validator(mode="after")
    def _fits_the_backend(self) -> ExternalSourceConfig:
        if self.send_image and self.writer.backend == "hf":
            raise ValueError(
                "has send_image: true with an hf writer, which is text-only (it cannot see the image): use an "
                "openai writer that takes images (e.g. gpt-4o, or a vision model behind vLLM) or set "
                "sample.external.send_image: false"
            )
        structured = getattr(self.writer, "structured_output", "none")
        if structured != "none":
            raise ValueError(
                f"writer.structured_output must be none (got {structured!r}): the writer answers with a list of "
                f"answers, not with the judges' verdict JSON"
            )
        return self


# ----- prompts -------------------------------------------------------------------------------------

_TURN_REQUIRED = {"question", "answer", "k"}
_TURN_ALLOWED = _TURN_REQUIRED | {"image_note"}
_KEYS = {"version", "roles", "prefill", "request_turn", "image_attached", "image_absent"}


@dataclass(frozen=True)
class ExternalPrompts:
    """The writer's prompt file: a system message per role, the request turn, the notes on the
    image and the hf prefill. `version` is in every request's cache key."""

    version: str
    roles: dict[str, str]
    prefill: str
    request_turn: Template
    image_attached: str
    image_absent: str
    path: str

    def request(self, row: dict, k: int, role: str, prefill: bool, send_image: bool) -> JudgeRequest:
        """The request for one entry: k wrong answers to its question, avoiding its answer."""
        note = self.image_attached if send_image else self.image_absent
        question = question_in_context(row["question"].strip(), row.get("context") or [])
        user = self.request_turn.substitute(question=question, answer=row["answer"].strip(),
                                            k=str(k), image_note=note)
        messages = (("system", self.roles[role]), ("user", user))
        start = self.prefill if prefill else ""
        if send_image:
            return ImageRequest(messages=messages, prefill=start, image_url=image_data_url(row["image"]))
        return JudgeRequest(messages=messages, prefill=start)


def load_external_prompts(path: str | Path) -> ExternalPrompts:
    """Read and check the writer's prompt file (see pipeline/external_prompts.yaml for the format)."""
    path = Path(path)
    where = str(path)
    raw = read_prompt_file(path, "sample.external.prompts")
    check_keys(raw, _KEYS, where)
    version = check_version(raw, where)
    roles = check_roles(raw, where)
    check_texts(raw, ("request_turn", "image_attached", "image_absent"), where)
    if not isinstance(raw["prefill"], str):
        raise PromptFileError(f"{where}: `prefill` must be a string ('' for none)")
    turn = check_templates(raw, {"request_turn": (_TURN_REQUIRED, _TURN_ALLOWED)}, where)["request_turn"]
    return ExternalPrompts(version=version, roles=roles, prefill=raw["prefill"], request_turn=turn,
                           image_attached=raw["image_attached"], image_absent=raw["image_absent"], path=str(path))


def check_writer(config: ExternalSourceConfig, prompts: ExternalPrompts) -> None:
    """Fail before any model is loaded if the writer and its prompt file do not fit together."""
    from pipeline.judges.panel import PanelConfigError

    if config.writer.role not in prompts.roles:
        raise PanelConfigError(
            f"sample.external.writer.role {config.writer.role!r} is not in {prompts.path} "
            f"(roles: {sorted(prompts.roles)})"
        )
    if getattr(config.writer, "prefill", False) and not prompts.prefill:
        raise PanelConfigError(
            f"sample.external.writer.prefill is on but {prompts.path} has an empty `prefill` text"
        )


# ----- requests with an image ------------------------------------------------------------------------


def image_data_url(image: bytes) -> str:
    """The encoded image as a data URL; PNG and JPEG as they are, anything else re-encoded as PNG."""
    if image.startswith(b"\x89PNG\r\n\x1a\n"):
        mime, data = "image/png", image
    elif image.startswith(b"\xff\xd8\xff"):
        mime, data = "image/jpeg", image
    else:
        from pipeline.data.images import decode_image

        buf = io.BytesIO()
        decode_image(image).convert("RGB").save(buf, format="PNG")
        mime, data = "image/png", buf.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass(frozen=True)
class ImageRequest(JudgeRequest):
    """A request whose last (user) message also carries an image, as OpenAI chat content parts.

    `as_dicts` is what the openai backend sends and what the cache key is computed over, so the
    image is part of the key. (The cache also stores each request beside its answer, for audit:
    with `send_image` it holds each image once more, base64-encoded.)"""

    image_url: str = ""

    def as_dicts(self) -> list[dict[str, Any]]:  # type: ignore[override]
        out: list[dict[str, Any]] = list(super().as_dicts())
        last = out[-1]
        out[-1] = {"role": last["role"], "content": [{"type": "text", "text": last["content"]},
                                                     {"type": "image_url", "image_url": {"url": self.image_url}}]}
        return out


# ----- parsing -------------------------------------------------------------------------------------

# A list item: `1. x`, `1) x`, `(1) x`, `1: x`, `- x`, `* x`, `• x` (the marker needs a space after it,
# so that "1.5 cm" is not read as item 5 cm).
_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}[.):]|\(\d{1,3}\)|[-*•])\s+(.*\S)\s*$")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


class MalformedAnswer(ValueError):
    """An answer without a readable list; `cause` is `empty` or `malformed`."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


def _clean(item: str) -> str:
    text = " ".join(item.split())
    for _ in range(3):  # nested wrappers: **"x"**.
        text = text.strip().rstrip(".,;:").strip()
        text = re.sub(r"^(\*\*|__|`)(.*)\1$", r"\2", text)
        text = re.sub(r"^([\"'“‘])(.*)([\"'”’])$", r"\2", text)
    return text.strip()


def parse_list(answer: str, start: str = "") -> list[str]:
    """The answers listed in a writer's reply (`start`, the request's prefill, + its continuation), in
    order, cleaned but not filtered (see the module doc).

    Raises `MalformedAnswer`: `empty` when the writer added nothing of its own, `malformed` when no
    list can be read."""
    if not answer.startswith(start):
        raise ValueError("the answer does not start with its prefill")
    text = answer.strip()
    if not answer[len(start):].strip():
        raise MalformedAnswer("empty", "empty answer")
    unfenced = _FENCE.sub("", text).strip()
    if unfenced.startswith("["):
        try:
            value = json.loads(unfenced[: unfenced.rindex("]") + 1])
        except ValueError:
            value = None
        if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                     for v in value):
            return [_clean(str(v)) for v in value]
    items = [_clean(m.group(1)) for m in map(_ITEM.match, text.splitlines()) if m]
    if not items:
        raise MalformedAnswer("malformed", "neither a JSON list nor a numbered or bulleted list")
    return items


def select_answers(items: Sequence[str], correct: str, k: int, closed: bool = False
                   ) -> tuple[list[str], Counter[str]]:
    """The first `k` usable items, and how many were left out for each reason (`empty`,
    `equal_to_chosen`, `counted_correct`, `duplicate`, `beyond_k`), all compared after
    `normalize_answer`. With `closed` (a closed question), an item that the evaluation's closed-question
    metric would score as correct (`pipeline.metrics.closed_correct`: the correct answer as a whole-word
    run in it, e.g. "No, there is no mass" for "no") is not a wrong answer either: `counted_correct`."""
    from pipeline.metrics import closed_correct, normalize_answer

    chosen = normalize_answer(correct)
    seen: set[str] = set()
    kept: list[str] = []
    dropped: Counter[str] = Counter()
    for item in items:
        key = normalize_answer(item)
        if not key:
            dropped["empty"] += 1
        elif key == chosen:
            dropped["equal_to_chosen"] += 1
        elif closed and closed_correct(item, correct):
            dropped["counted_correct"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        elif len(kept) >= k:
            dropped["beyond_k"] += 1
        else:
            seen.add(key)
            kept.append(item)
    return kept, dropped


# ----- asking --------------------------------------------------------------------------------------

ENTRY_CAUSES = ("backend", "empty", "malformed", "all_rejected")  # why an entry has no candidate
ITEM_CAUSES = ("empty", "equal_to_chosen", "counted_correct", "duplicate", "beyond_k")  # why a listed answer was not kept


@dataclass
class ExternalAnswers:
    """What the writer wrote: the kept answers of every entry (in row order) and the counts."""

    texts: list[list[str]]
    metrics: dict[str, Any]  # the `external` part of reports/sample.json


def writer_metadata(config: ExternalSourceConfig, prompts: ExternalPrompts) -> dict[str, Any]:
    writer = config.writer
    return {"writer": writer.name, "backend": writer.backend, "model": writer.model,
            "prompt_version": prompts.version, "send_image": config.send_image}


def ask_writer(rows: Sequence[dict], k: int, writer: CachedJudge, prompts: ExternalPrompts,
               config: ExternalSourceConfig) -> ExternalAnswers:
    """One request per entry (identical requests asked once), every answer through the response
    cache; parse and select each answer; count what was asked, written and left out."""
    from tqdm import tqdm

    requests = [prompts.request(row, k, writer.role, writer.prefill, config.send_image) for row in rows]
    with tqdm(total=len(requests), unit="answer", desc=f"sample external {writer.name}", dynamic_ncols=True) as bar:
        writer.on_answer = bar.update
        answers, error = writer.ask_each(requests) if requests else ([], None)
        writer.on_answer = None
    keys = [writer.key(r) for r in requests]
    texts: list[list[str]] = []
    without: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    short = 0
    for row, request, answer in zip(rows, requests, answers, strict=True):
        kept: list[str] = []
        if answer is None:
            without["backend"] += 1
        else:
            try:
                items = parse_list(answer, request.prefill)
            except MalformedAnswer as bad:
                without[bad.cause] += 1
            else:
                kept, left_out = select_answers(items, row["answer"], k, closed=row["answer_type"] == "closed")
                dropped.update(left_out)
                if not kept:
                    without["all_rejected"] += 1
        short += 0 < len(kept) < k
        texts.append(kept)
    metrics = {
        **writer_metadata(config, prompts),
        "requests": len(requests),
        "unique_requests": len(set(keys)),  # entries sharing question, answer (and image) share a request
        "requested_candidates": k * len(rows),
        "written_candidates": sum(len(t) for t in texts),
        "entries_short": short,  # some but fewer than k candidates
        "entries_without_candidates": sum(without.values()),
        # per entry, duplicates included: backend (no answer: not cached, a rerun asks again), empty,
        # malformed (cached: what the writer said), all_rejected (every listed answer left out)
        "failed_by_cause": {cause: without[cause] for cause in ENTRY_CAUSES},
        "dropped_answers": {cause: dropped[cause] for cause in ITEM_CAUSES},
        "backend_error": error,  # the backend's first error message, if any
    }
    return ExternalAnswers(texts=texts, metrics=metrics)


def check_failed(answers: ExternalAnswers, config: ExternalSourceConfig) -> str | None:
    """The failure message if more than `max_failed` of the entries got no candidate, else None."""
    n = answers.metrics["requests"]
    without = answers.metrics["entries_without_candidates"]
    if not n or without / n <= config.max_failed:
        return None
    causes = ", ".join(f"{c} {v}" for c, v in answers.metrics["failed_by_cause"].items() if v)
    error = answers.metrics["backend_error"]
    shown = f"; the backend said: {error}" if error else ""
    return (
        f"{without} of {n} entries ({without / n:.1%}) got no dispreferred candidate from the external writer "
        f"{config.writer.name!r} ({causes}), more than sample.external.max_failed ({config.max_failed:.1%}){shown}. "
        f"Check the writer (reports/sample.json: failed_by_cause, dropped_answers), use a stronger model, or raise "
        f"sample.external.max_failed"
    )


# ----- scoring with the SFT model --------------------------------------------------------------------

# Everything whose code determines a scored row: a change to any of them gives a new resume key.
EXTERNAL_CODE = ("pipeline.external_dispreferred", "pipeline.self_contrast", "pipeline.grouped_scoring",
                 "pipeline.batching", "pipeline.models")


def external_batch(vlm: VLM, rows: Sequence[dict], texts: Sequence[Sequence[str]]) -> list[dict]:
    """CANDIDATES_SCHEMA rows for a batch: each entry's chosen answer and written answers tokenized
    and scored under the full image by the SFT model (one grouped pass)."""
    from pipeline.self_contrast import score_candidates

    chosen = [vlm.answer_ids(row["answer"]) for row in rows]
    ids = [[vlm.answer_ids(t) for t in written] for written in texts]
    pairs = [(b, c) for b, c in enumerate(chosen)] + [(b, t) for b, entry in enumerate(ids) for t in entry]
    logprobs = iter(score_candidates(vlm, [r["image"] for r in rows], [r["question"] for r in rows], pairs,
                                     contexts=[r["context"] for r in rows]))
    chosen_logprob = [next(logprobs) for _ in rows]
    out = []
    for b, row in enumerate(rows):
        candidates = [
            {"text": text, "token_ids": tokens, "level": level, "positions": [], "original_tokens": [],
             "replacement_tokens": [], "logprob": next(logprobs)}
            for level, (text, tokens) in enumerate(zip(texts[b], ids[b], strict=True), start=1)
        ]
        out.append({**{key: row[key] for key in VQA_NAMES}, "chosen_token_ids": chosen[b],
                    "chosen_logprob": chosen_logprob[b], "sensitivity": [], "candidates": candidates})
    return out


def score_pool(vlm: VLM, rows: Sequence[dict], texts: Sequence[Sequence[str]], config: SampleConfig,
               work_dir: str | Path, inputs: dict[str, str]) -> BatchRun:
    """`external_batch` over every row in `config.batch_size` batches, resumable under `work_dir`
    (keyed like `pipeline.self_contrast.sample_pool`, plus a digest of the written answers)."""
    import torch
    import transformers

    from pipeline.fingerprint import code_version, fingerprint
    from pipeline.resume import BatchStore, run_batches
    from pipeline.schema import CANDIDATES_SCHEMA

    key = fingerprint("sample-external", inputs, config.to_dict(), code_version(EXTERNAL_CODE),
                      fingerprint([list(t) for t in texts]), torch.__version__, transformers.__version__)
    store = BatchStore(work_dir, key, CANDIDATES_SCHEMA)
    written = {row["id"]: list(t) for row, t in zip(rows, texts, strict=True)}
    # The parts stay until the stage has written its output (it calls `pipeline.resume.clear_all`).
    return run_batches(list(rows), config.batch_size,
                       lambda batch: external_batch(vlm, batch, [written[r["id"]] for r in batch]),
                       store, desc="sample external", clear=False)


# ----- the stage's library half ----------------------------------------------------------------------


@dataclass
class ExternalRun:
    done: BatchRun
    metrics: dict[str, Any]  # `external` of reports/sample.json
    timings: dict[str, Any]  # cache use and seconds (they depend on earlier runs: reports/timings)


def run_external(
    rows: Sequence[dict],
    config: SampleConfig,
    prompts: ExternalPrompts,
    cache_path: str | Path,
    load_vlm: Callable[[], VLM],
    work_dir: str | Path,
    inputs: dict[str, str],
    on_failure: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> ExternalRun:
    """Ask the writer for every entry (through the response cache at `cache_path`), check
    `max_failed`, then load the SFT model (`load_vlm`) and score the answers, resumably.

    The writer is asked before the SFT model is loaded, so an unreachable endpoint or a writer that
    answers nothing fails in seconds. On too many entries without a candidate,
    `on_failure(metrics, timings)` gets the report before the `DataError` is raised."""
    from pipeline.judges.cache import ResponseCache
    from pipeline.judges.judge import build_judges
    from pipeline.judges.metrics import cache_summary

    external = config.external
    start = time.perf_counter()
    with ResponseCache(cache_path) as cache:
        writer = build_judges([external.writer], cache, {"external": prompts.version}, external.request_retry)[0]
        asking = time.perf_counter()
        answers = ask_writer(rows, config.k, writer, prompts, external)
    timings: dict[str, Any] = {
        "writer_setup_seconds": round(asking - start, 3),
        "writer_seconds": round(time.perf_counter() - asking, 3),
        "cache": cache_summary({writer.name: writer.stats}),
        "request_retries": dict(sorted(getattr(writer.backend, "retries", {}).items())),
    }
    del writer  # an hf writer's model is not needed any more
    failure = check_failed(answers, external)
    if failure is not None:
        if on_failure is not None:
            on_failure({**answers.metrics, "status": "failed", "failure": failure}, timings)
        raise DataError(failure)
    done = score_pool(load_vlm(), rows, answers.texts, config, work_dir, inputs)
    return ExternalRun(done=done, metrics=answers.metrics, timings=timings)
