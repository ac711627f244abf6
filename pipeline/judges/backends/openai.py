"""The `openai` judge backend: the `openai` client against any OpenAI-compatible chat endpoint.

Works with a vLLM (or TGI, llama.cpp, Ollama) server hosting a medical LLM such as Med42 or
BioMistral, and with hosted APIs. Requests run `max_concurrency` at a time in worker threads.

Preflight (`preflight`, before any judging): one `GET {base_url}/models` with a short timeout, so
an unreachable server, a refused key, a wrong path or a model the server does not serve fails in
seconds, not after minutes of retries or with answers cached under the wrong model name.

Retries are ours, not the client's (`max_retries=0`), so each one is counted in the stage metrics
and announced on stderr (at most one line every few seconds per judge): 429 (honouring
Retry-After), 5xx, 408, 409, timeouts and connection errors are retried with exponential backoff;
a 200 whose body is not a chat completion is retried the same way.

Circuit breaker (per turn, i.e. per `complete` call): the first 401/403/404/405 (a key or path
problem: every other request would get the same), a connection error that outlasts every retry
(the server is gone), or `max_consecutive_failures` requests in a row that fail for good stop the
turn at once: requests not yet sent are never sent, retry waits end, requests in flight are
abandoned. Answers that already arrived are handed over (and cached) before the `JudgeError`.
Ctrl-C does the same within a fraction of a second: workers are daemon threads and every wait is
on an Event, so nothing waits out a backoff or a request timeout.

Error messages name the judge, the base_url, the HTTP status, the server's own error text
(truncated) and a hint. The API key is read from the environment variable named in params.yaml and
goes to the client only: it is in no cache key, artifact, transcript or log line, and every error
message built here is scrubbed of it and raised without the client's exception attached.
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import openai

from pipeline.judges.judge import JudgeError, JudgeRequest
from pipeline.judges.panel import Generation, OpenAIJudgeConfig, RequestRetry
from pipeline.judges.parsing import SCORE_MAX, SCORE_MIN

PREFLIGHT_TIMEOUT_S = 10.0  # cap on the preflight's timeout: a host that drops packets fails in seconds
NOTE_INTERVAL_S = 2.0  # at most one retry line per judge this often
BODY_CHARS = 300  # how much of a server's error body a message quotes
POLL_S = 0.1  # how often the consumer checks for a tripped breaker (and lets Ctrl-C in)

# The answer format of pipeline/judges/parsing.py as a JSON schema, for constrained decoding.
# `enum` rather than minimum/maximum: every structured-output implementation supports it.
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "enum": list(range(SCORE_MIN, SCORE_MAX + 1))},
        "reason": {"type": "string"},
    },
    "required": ["score", "reason"],
    "additionalProperties": False,
}
SCHEMA_NAME = "clinical_relevance_verdict"

# HTTP statuses that stop a turn at once: the key or the path is wrong, so every request would fail.
_FATAL = (401, 403, 404, 405)


class _Retryable(Exception):
    def __init__(self, kind: str, detail: str, wait: float | None = None) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.wait = kind, detail, wait


class _Failed(Exception):
    """A request that failed for good; `kind`: fatal (401/403/404/405), connection or other."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message, self.kind = message, kind


class _Stopped(Exception):
    """The turn was stopped (breaker or Ctrl-C) while this request waited: it is not sent."""


def _retry_after(err: openai.APIStatusError) -> float | None:
    value = err.response.headers.get("retry-after") if err.response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: use our own backoff
        return None


def _stderr_note(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)  # above the progress bar, if there is one


class _Breaker:
    """The circuit breaker of one turn: decides when a failed request stops the other ones."""

    def __init__(self, limit: int, stop: threading.Event) -> None:
        self.limit, self.stop = limit, stop
        self.lock = threading.Lock()
        self.in_a_row = 0
        self.reason: str | None = None

    def success(self) -> None:
        with self.lock:
            self.in_a_row = 0

    def failure(self, err: _Failed) -> None:
        with self.lock:
            self.in_a_row += 1
            if self.reason is not None:
                return
            if err.kind in ("fatal", "connection"):
                self.reason = err.message
            elif self.in_a_row >= self.limit:
                self.reason = f"{self.in_a_row} requests in a row failed; the last: {err.message}"
            else:
                return
        self.stop.set()


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
        note: Callable[[str], None] | None = None,
    ) -> None:
        key = os.environ.get(api_key_env)
        if not key:
            raise JudgeError(
                f"judge {name}: environment variable {api_key_env} is not set or empty; export the API key "
                f"there (for a server without authentication, any non-empty value)"
            )
        self.name, self.model, self.base_url = name, model, base_url
        self.api_key_env, self.timeout_s = api_key_env, timeout_s
        self.max_concurrency = max_concurrency
        self.retry = retry
        self.note = note or _stderr_note  # where retry lines go (stderr, above the progress bar)
        self._secret = key
        self._client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout_s)
        self._lock = threading.Lock()
        self._last_note = -math.inf
        self._quiet_retries = 0  # retries since the last line
        # retried attempts by cause: 429, 5xx, 408, 409, timeout, connection, bad_response
        self.retries: Counter[str] = Counter()

    @classmethod
    def from_config(cls, cfg: OpenAIJudgeConfig, retry: RequestRetry,
                    note: Callable[[str], None] | None = None) -> OpenAIBackend:
        return cls(cfg.name, cfg.model, str(cfg.base_url), str(cfg.api_key_env), cfg.timeout_s,
                   cfg.max_concurrency, retry, note=note)

    def __repr__(self) -> str:  # never the client (it holds the key)
        return f"OpenAIBackend(name={self.name!r}, model={self.model!r}, base_url={self.base_url!r})"

    def identity(self) -> dict[str, Any]:
        # The served model name identifies the answers; the URL does not (moving a server must not
        # invalidate the cache) and the key must never be in a key or a stored record.
        return {"backend": "openai", "model": self.model}

    # ------------------------------------------------------------------------------ messages

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***")

    def _excerpt(self, text: str) -> str:
        text = " ".join(self._scrub(text).split())  # scrub before cutting: no half key survives
        if not text:
            return "(empty body)"
        return text if len(text) <= BODY_CHARS else text[:BODY_CHARS] + "…"

    def _body(self, err: openai.APIStatusError) -> str:
        try:
            return self._excerpt(err.response.text)
        except Exception:  # a body that cannot be read (closed stream, bad encoding)
            return "(unreadable body)"

    def _cause(self, err: Exception) -> str:
        cause = err.__cause__ or err.__context__
        text = str(cause) if cause is not None and str(cause) else str(err)
        return self._excerpt(f"{type(cause).__name__}: {text}" if cause is not None else text)

    def _status_message(self, err: openai.APIStatusError, what: str) -> str:
        status = err.status_code
        hints = {
            401: f"the server refused the API key in ${self.api_key_env}: check its value",
            403: f"the key in ${self.api_key_env} may not use this endpoint or model {self.model!r}",
            404: f"does base_url end in /v1 (e.g. http://localhost:8000/v1), and does the server serve "
                 f"model {self.model!r}?",
            405: "does base_url end in /v1 (e.g. http://localhost:8000/v1)?",
            400: "the server rejected the request: a reasoning model may need `sampling_fields` (e.g. "
                 "{max_tokens: max_completion_tokens, temperature: null}), a server without JSON-schema "
                 "support `structured_output: none`",
        }
        hint = hints.get(status, hints[400] if status == 422 else "")
        if what.startswith("GET") and status == 404:
            hint += " (a server without a /models endpoint: set `preflight: false`)"
        return (f"judge {self.name}: HTTP {status} from {self.base_url} ({what}): {self._body(err)}"
                + (f"; {hint}" if hint else ""))

    def _announce_retry(self, err: _Retryable, attempt: int, wait: float) -> None:
        with self._lock:
            self.retries[err.kind] += 1
            now = time.monotonic()
            if now - self._last_note < NOTE_INTERVAL_S:
                self._quiet_retries += 1
                return
            quiet, self._quiet_retries, self._last_note = self._quiet_retries, 0, now
        more = f"; {quiet} other retries since the last line" if quiet else ""
        self.note(f"judge {self.name}: {err.detail}; retry {attempt + 1} of {self.retry.max_retries} "
                  f"in {wait:.1f} s{more}")

    # ------------------------------------------------------------------------------ preflight

    def preflight(self) -> list[str]:
        """GET {base_url}/models once; fail with a clear `JudgeError` unless the server answers with a
        model list that holds `model`. Returns the served model ids."""
        timeout = min(self.timeout_s, PREFLIGHT_TIMEOUT_S)
        try:
            raw = self._client.models.with_raw_response.list(timeout=timeout)
            text = raw.http_response.text
        except openai.APIStatusError as err:
            raise JudgeError(self._status_message(err, "GET /models, the preflight")) from None
        except openai.APITimeoutError:  # before APIConnectionError: it is a subclass
            raise JudgeError(
                f"judge {self.name}: no answer from {self.base_url} within {timeout:g} s (GET /models, the "
                f"preflight); is the server up, and are host and port right?"
            ) from None
        except openai.APIConnectionError as err:
            raise JudgeError(
                f"judge {self.name}: connection error from {self.base_url} (GET /models, the preflight: "
                f"{self._cause(err)}); is the server running, and are host and port right?"
            ) from None
        try:
            ids = [str(m["id"]) for m in json.loads(text)["data"]]
        except (ValueError, KeyError, TypeError):
            raise JudgeError(
                f"judge {self.name}: GET {self.base_url.rstrip('/')}/models did not answer with a model list "
                f"({self._excerpt(text)}); is base_url the API root, ending in /v1? (a server without a "
                f"/models endpoint: set `preflight: false`)"
            ) from None
        if self.model not in ids:
            shown = ", ".join(repr(i) for i in ids[:10]) or "none"
            more = f" and {len(ids) - 10} more" if len(ids) > 10 else ""
            raise JudgeError(
                f"judge {self.name}: model {self.model!r} is not served by {self.base_url}; it serves {shown}{more}. "
                f"Set `model` to a served name (vLLM: --served-model-name, llama.cpp: --alias)"
            )
        return ids

    # ------------------------------------------------------------------------------ requests

    def request_kwargs(self, request: JudgeRequest, generation: Generation) -> dict[str, Any]:
        """The arguments of `chat.completions.create` for one request (without the key)."""
        kwargs: dict[str, Any] = {"model": self.model, "messages": request.as_dicts()}
        extra = dict(generation.extra_body)
        sampling = {"max_tokens": generation.max_new_tokens, "temperature": generation.temperature}
        for field, value in sampling.items():
            target = generation.sampling_fields.get(field, field)
            if target is None:  # dropped: the server's default applies
                continue
            if target == field:
                kwargs[field] = value
            else:
                extra[target] = value
        if generation.structured_output == "response_format":
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": SCHEMA_NAME, "schema": ANSWER_SCHEMA, "strict": True},
            }
        elif generation.structured_output == "guided_json":
            extra["guided_json"] = ANSWER_SCHEMA
        if extra:
            kwargs["extra_body"] = extra
        return kwargs

    def _attempt(self, request: JudgeRequest, generation: Generation) -> str:
        where = self.base_url
        try:
            response = self._client.chat.completions.create(**self.request_kwargs(request, generation))
        except openai.APIStatusError as err:
            status = err.status_code
            if status == 429:
                raise _Retryable("429", f"HTTP 429 rate limited by {where}", _retry_after(err)) from None
            if status >= 500:
                raise _Retryable("5xx", f"HTTP {status} from {where}: {self._body(err)}") from None
            if status in (408, 409):  # request timeout, lock conflict: transient (as the client treats them)
                raise _Retryable(str(status), f"HTTP {status} from {where}: {self._body(err)}") from None
            message = self._status_message(err, "POST /chat/completions")
            raise _Failed(message, "fatal" if status in _FATAL else "other") from None
        except openai.APITimeoutError:  # before APIConnectionError: it is a subclass
            raise _Retryable("timeout", f"no answer from {where} within {self.timeout_s:g} s") from None
        except openai.APIConnectionError as err:
            raise _Retryable("connection", f"connection error from {where} ({self._cause(err)})") from None
        except (openai.APIResponseValidationError, json.JSONDecodeError) as err:  # body is not a completion
            raise _Retryable("bad_response", f"unreadable response from {where} ({type(err).__name__})") from None
        choices = getattr(response, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            raise _Retryable("bad_response", f"response from {where} has no choices")
        # No content (e.g. a refusal) is an empty answer: the parser rejects it and the protocol re-asks.
        return choices[0].message.content or ""

    def _one(self, request: JudgeRequest, generation: Generation, stop: threading.Event) -> str:
        retry = self.retry
        for attempt in range(retry.max_retries + 1):
            if stop.is_set():
                raise _Stopped
            try:
                return self._attempt(request, generation)
            except _Retryable as err:
                if attempt == retry.max_retries:
                    kind = "connection" if err.kind == "connection" else "other"
                    raise _Failed(f"judge {self.name}: {err.detail}, still after {retry.max_retries} retries",
                                  kind) from None
                wait = min(retry.max_backoff_s, retry.backoff_s * 2**attempt)
                if err.wait is not None:
                    wait = min(retry.max_backoff_s, max(wait, err.wait))
                if stop.is_set():
                    raise _Stopped from None
                self._announce_retry(err, attempt, wait)
                if stop.wait(wait):  # not time.sleep: a stopped turn or Ctrl-C ends the wait at once
                    raise _Stopped from None
        raise AssertionError("unreachable")

    def complete(self, requests: Sequence[JudgeRequest], generation: Generation) -> Iterator[tuple[int, str]]:
        if any(r.prefill for r in requests):
            raise JudgeError(f"judge {self.name}: prefill is not supported by the openai backend")
        n = len(requests)
        if not n:
            return
        stop = threading.Event()
        breaker = _Breaker(self.retry.max_consecutive_failures, stop)
        jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(n):
            jobs.put(i)
        results: queue.SimpleQueue[tuple[int, str | None, BaseException | None]] = queue.SimpleQueue()

        def work() -> None:
            while not stop.is_set():
                try:
                    i = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    text = self._one(requests[i], generation, stop)
                except _Stopped:
                    return
                except _Failed as err:
                    results.put((i, None, err))
                    breaker.failure(err)
                    continue
                except BaseException as err:  # a bug: hand it to the caller, stop the others
                    results.put((i, None, err))
                    stop.set()
                    return
                breaker.success()
                results.put((i, text, None))

        # Daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's threads at
        # exit, which would make Ctrl-C wait for every request in flight (up to timeout_s).
        for k in range(min(self.max_concurrency, n)):
            threading.Thread(target=work, name=f"judge-{self.name}-{k}", daemon=True).start()
        answered, failures = 0, []
        try:
            while answered + len(failures) < n:
                try:
                    i, text, err = results.get(timeout=POLL_S)
                except queue.Empty:
                    if stop.is_set() and results.empty():
                        break  # the breaker tripped: requests in flight are abandoned
                    continue
                if err is not None:
                    if not isinstance(err, _Failed):
                        raise err
                    failures.append(err)
                    continue
                answered += 1
                yield i, text
        finally:
            # Whatever ends the turn (done, breaker, Ctrl-C, a failed cache write): send nothing more.
            stop.set()
        if breaker.reason is not None:
            # Every answer that did arrive was yielded (and cached) first: a rerun asks only the rest.
            raise JudgeError(
                f"{breaker.reason} (the turn was stopped: {answered} of {n} requests answered and kept, "
                f"{n - answered - len(failures)} not sent or abandoned)"
            )
        if failures:
            first = failures[0].message
            raise JudgeError(first if len(failures) == 1 else f"{len(failures)} of {n} requests failed; first: {first}")
