"""A judge: one configured backend behind the persistent response cache.

The consensus protocol talks to judges only through `ask` (a batch of requests in, one raw
answer per request out), so it runs the same on scripted test judges, a local model or a
remote endpoint.
`CachedJudge` answers from the cache where it can and asks its backend for the rest, storing
each answer the moment the backend hands it over: a crash loses at most the answers in flight.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from pipeline.errors import ServiceError
from pipeline.judges.cache import ResponseCache
from pipeline.judges.panel import Generation, JudgeConfig, RequestRetry


class JudgeError(ServiceError):
    """A judge could not be asked (endpoint down after every retry, bad request, missing key)."""


@dataclass(frozen=True)
class JudgeRequest:
    """What is sent to a judge: chat messages, and an optional start of the assistant's answer."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    prefill: str = ""  # hf only: the model continues this text

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


class Backend(Protocol):
    def identity(self) -> dict[str, Any]:
        """Everything about the backend that determines an answer (never a secret): part of the cache key."""
        ...

    def complete(self, requests: Sequence[JudgeRequest], generation: Generation) -> Iterator[tuple[int, str]]:
        """Yield (index into `requests`, generated continuation) as answers arrive, in any order."""
        ...


@dataclass
class JudgeStats:
    hits: int = 0  # answers served from the cache
    asked: int = 0  # answers received from the backend (and stored)
    deduplicated: int = 0  # identical requests within one batch, asked once


def request_key(identity: dict[str, Any], request: JudgeRequest, generation: Generation, prompt_version: Any) -> str:
    """SHA-256 over everything that determines an answer: backend, model, messages, prefill, decoding, prompts."""
    payload = {
        "identity": identity,
        "messages": request.as_dicts(),
        "prefill": request.prefill,
        "generation": generation.as_dict(),
        "prompt_version": prompt_version,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class CachedJudge:
    """A judge of the panel: its config, its backend, and the shared response cache.

    `decoding` replaces the config's decoding settings (the rationales of `score.rationales` use
    the judge's backend with their own length cap and no structured output).
    """

    config: JudgeConfig
    backend: Backend
    cache: ResponseCache
    prompt_version: Any
    on_answer: Callable[[int], None] | None = None  # progress: called with the number of answers obtained
    stats: JudgeStats = field(default_factory=JudgeStats)
    decoding: Generation | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def role(self) -> str:
        return self.config.role

    @property
    def prefill(self) -> bool:
        return getattr(self.config, "prefill", False)  # only hf judges can prefill

    @property
    def generation(self) -> Generation:
        return self.decoding if self.decoding is not None else self.config.generation

    def key(self, request: JudgeRequest) -> str:
        """The cache key of `request` for this judge."""
        return request_key(self.backend.identity(), request, self.generation, self.prompt_version)

    def ask(self, requests: Sequence[JudgeRequest]) -> list[str]:
        answers, _ = self._ask(requests, partial=False)  # raises a JudgeError rather than leave one out
        return cast(list[str], answers)

    def ask_each(self, requests: Sequence[JudgeRequest]) -> tuple[list[str | None], str | None]:
        """Like `ask`, but a request the backend fails on (a `JudgeError`: an HTTP 400, retries
        exhausted, a stopped turn) gets None instead of failing the batch; also returns the
        backend's error message (None if every request was answered). Failed requests are not
        cached, so a rerun asks them again."""
        return self._ask(requests, partial=True)

    def _ask(self, requests: Sequence[JudgeRequest], partial: bool) -> tuple[list[str | None], str | None]:
        identity = self.backend.identity()
        generation = self.generation
        keys = [request_key(identity, r, generation, self.prompt_version) for r in requests]
        answers: dict[str, str] = self.cache.get_many(keys)
        hits = sum(1 for k in keys if k in answers)
        self.stats.hits += hits
        if hits and self.on_answer:
            self.on_answer(hits)

        multiplicity = Counter(keys)
        todo: dict[str, int] = {}  # key -> index of the first request with that key
        for i, key in enumerate(keys):
            if key not in answers and key not in todo:
                todo[key] = i
        self.stats.deduplicated += sum(1 for k in keys if k not in answers) - len(todo)
        error: str | None = None
        if todo:
            pending = list(todo.items())
            batch = [requests[i] for _, i in pending]
            try:
                for j, completion in self.backend.complete(batch, generation):
                    key = pending[j][0]
                    record = {"judge": self.name, "identity": identity, "generation": generation.as_dict(),
                              "prompt_version": self.prompt_version, "messages": batch[j].as_dicts(),
                              "prefill": batch[j].prefill}
                    self.cache.put(key, completion, record)  # durable before anything else happens
                    answers[key] = completion
                    self.stats.asked += 1
                    if self.on_answer:
                        self.on_answer(multiplicity[key])
            except JudgeError as err:
                if not partial:
                    raise
                error = str(err)
            missing = [k for k, _ in pending if k not in answers]
            if missing:
                message = f"judge {self.name}: backend returned no answer for {len(missing)} request(s)"
                if not partial:
                    raise JudgeError(message)
                error = error or message
        return [r.prefill + answers[k] if k in answers else None for r, k in zip(requests, keys, strict=True)], error


def build_judges(
    configs: Sequence[JudgeConfig],
    cache: ResponseCache,
    prompt_version: Any,
    request_retry: RequestRetry,
) -> list[CachedJudge]:
    """Instantiate the panel. Remote judges come first, each checked by its preflight
    (`GET {base_url}/models`) where enabled, so a dead endpoint, a refused key or an unknown model
    fails in seconds, before any local model is loaded. Judges that share a local model share one
    loaded copy of it."""
    backends: dict[str, Backend] = {}
    for cfg in configs:
        if cfg.backend == "openai":
            from pipeline.judges.backends.openai import OpenAIBackend

            remote = OpenAIBackend.from_config(cfg, request_retry)
            if cfg.preflight:
                remote.preflight()
            backends[cfg.name] = remote
    loaded: dict[str, Any] = {}
    for cfg in configs:
        if cfg.backend == "hf":
            from pipeline.judges.backends.hf import HFBackend, load_model

            if cfg.model not in loaded:
                loaded[cfg.model] = load_model(cfg.model)
            backends[cfg.name] = HFBackend(loaded[cfg.model], batch_size=cfg.batch_size)
        elif cfg.backend != "openai":  # parse_score_config rejects anything else
            raise JudgeError(f"judge {cfg.name}: unknown backend {cfg.backend!r}")
    return [CachedJudge(config=cfg, backend=backends[cfg.name], cache=cache, prompt_version=prompt_version)
            for cfg in configs]
