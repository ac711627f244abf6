"""The `openai` judge backend: the `openai` client against any OpenAI-compatible chat endpoint.

Works with a vLLM (or TGI, llama.cpp, Ollama) server hosting a medical LLM such as Med42 or
BioMistral, and with hosted APIs. Requests run `max_concurrency` at a time in a thread pool.

Retries are ours, not the client's (`max_retries=0`), so each one is counted in the stage metrics:
429 (honouring Retry-After), 5xx, 408, 409, timeouts and connection errors are retried with
exponential backoff; a 200 whose body is not a chat completion is retried the same way. Any other
HTTP error (400, 401, 404...) is a configuration problem and fails at once.

The API key is read from the environment variable named in params.yaml and goes to the client
only: it is in no cache key, artifact, transcript or log line, and every error message built
here is scrubbed of it and raised without the client's exception attached.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import openai

from pipeline.judges.judge import JudgeError, JudgeRequest
from pipeline.judges.panel import Generation, OpenAIJudgeConfig, RequestRetry


class _Retryable(Exception):
    def __init__(self, kind: str, detail: str, wait: float | None = None) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.wait = kind, detail, wait


def _retry_after(err: openai.APIStatusError) -> float | None:
    value = err.response.headers.get("retry-after") if err.response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: use our own backoff
        return None


class OpenAIBackend:
    def __init__(
        self,
        name: str,
        model: str,
        base_url: str,
        api_key_env: str,
        timeout_s: float,
        max_concurrency: int,
        retry: RequestRetry,
    ) -> None:
        key = os.environ.get(api_key_env)
        if not key:
            raise JudgeError(
                f"judge {name}: environment variable {api_key_env} is not set or empty; export the API key "
                f"there (for a server without authentication, any non-empty value)"
            )
        self.name, self.model, self.base_url = name, model, base_url
        self.max_concurrency = max_concurrency
        self.retry = retry
        self._secret = key
        self._client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout_s)
        self._lock = threading.Lock()
        # retried attempts by cause: 429, 5xx, 408, 409, timeout, connection, bad_response
        self.retries: Counter[str] = Counter()

    @classmethod
    def from_config(cls, cfg: OpenAIJudgeConfig, retry: RequestRetry) -> OpenAIBackend:
        return cls(cfg.name, cfg.model, str(cfg.base_url), str(cfg.api_key_env), cfg.timeout_s,
                   cfg.max_concurrency, retry)

    def __repr__(self) -> str:  # never the client (it holds the key)
        return f"OpenAIBackend(name={self.name!r}, model={self.model!r}, base_url={self.base_url!r})"

    def identity(self) -> dict[str, Any]:
        # The served model name identifies the answers; the URL does not (moving a server must not
        # invalidate the cache) and the key must never be in a key or a stored record.
        return {"backend": "openai", "model": self.model}

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***")

    def _attempt(self, request: JudgeRequest, generation: Generation) -> str:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": request.as_dicts(),
            "max_tokens": generation.max_new_tokens,
            "temperature": generation.temperature,
        }
        if generation.extra_body:
            kwargs["extra_body"] = generation.extra_body
        try:
            response = self._client.chat.completions.create(**kwargs)
        except openai.RateLimitError as err:
            raise _Retryable("429", "HTTP 429 rate limited", _retry_after(err)) from None
        except openai.APIStatusError as err:
            if err.status_code >= 500:
                raise _Retryable("5xx", f"HTTP {err.status_code} server error") from None
            if err.status_code in (408, 409):  # request timeout, lock conflict: transient (as the client treats them)
                raise _Retryable(str(err.status_code), f"HTTP {err.status_code}") from None
            raise JudgeError(
                f"judge {self.name}: HTTP {err.status_code} from {self.base_url}: {self._scrub(str(err.message))}"
            ) from None
        except openai.APITimeoutError:  # before APIConnectionError: it is a subclass
            raise _Retryable("timeout", "request timed out") from None
        except openai.APIConnectionError:
            raise _Retryable("connection", "connection error") from None
        except (openai.APIResponseValidationError, json.JSONDecodeError) as err:  # body is not a completion
            raise _Retryable("bad_response", f"unreadable response ({type(err).__name__})") from None
        choices = getattr(response, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            raise _Retryable("bad_response", "response has no choices")
        # No content (e.g. a refusal) is an empty answer: the parser rejects it and the protocol re-asks.
        return choices[0].message.content or ""

    def _one(self, request: JudgeRequest, generation: Generation) -> str:
        retry = self.retry
        for attempt in range(retry.max_retries + 1):
            try:
                return self._attempt(request, generation)
            except _Retryable as err:
                if attempt == retry.max_retries:
                    raise JudgeError(
                        f"judge {self.name}: {err.detail} from {self.base_url}, still after "
                        f"{retry.max_retries} retries"
                    ) from None
                with self._lock:
                    self.retries[err.kind] += 1
                wait = min(retry.max_backoff_s, retry.backoff_s * 2**attempt)
                if err.wait is not None:
                    wait = min(retry.max_backoff_s, max(wait, err.wait))
                time.sleep(wait)
        raise AssertionError("unreachable")

    def complete(self, requests: Sequence[JudgeRequest], generation: Generation) -> Iterator[tuple[int, str]]:
        if any(r.prefill for r in requests):
            raise JudgeError(f"judge {self.name}: prefill is not supported by the openai backend")
        failures: list[str] = []
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix=f"judge-{self.name}")
        try:
            futures = {pool.submit(self._one, r, generation): i for i, r in enumerate(requests)}
            for future in as_completed(futures):
                try:
                    text = future.result()
                except JudgeError as err:
                    failures.append(self._scrub(str(err)))
                    continue
                yield futures[future], text
        finally:
            # If the caller stops early (Ctrl-C, a failed cache write), do not send what is queued.
            pool.shutdown(wait=True, cancel_futures=True)
        if failures:
            # Every answer that did arrive was yielded (and cached) first: a rerun asks only these.
            raise JudgeError(f"{len(failures)} request(s) failed; first: {failures[0]}")
