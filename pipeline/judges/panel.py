"""The judge panel and the rest of the `score:` section of params.yaml, parsed and validated.

Every key is checked here, before any model is loaded or any request is sent, so that a typo in
params.yaml fails in a second with a message naming the key, not after an hour of judging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("hf", "openai")
DEFAULT_PROMPTS = "pipeline/judges/prompts.yaml"
DEFAULT_CACHE = "data/work/judge_cache.sqlite"


class PanelConfigError(ValueError):
    """The `score:` section of params.yaml is invalid."""


@dataclass(frozen=True)
class Generation:
    """Decoding settings of one judge; part of the cache key, so changing one asks again."""

    max_new_tokens: int = 48
    temperature: float = 0.0  # 0 = greedy (hf) / temperature 0 (openai): reproducible verdicts
    extra_body: dict[str, Any] = field(default_factory=dict)  # openai only: passed to the server as is

    def as_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "extra_body": self.extra_body}


@dataclass(frozen=True)
class JudgeConfig:
    name: str
    role: str  # a key of `roles:` in the prompts file: the judge's system prompt
    backend: str  # "hf" | "openai"
    model: str  # hf: "smollm2" (packaged offline weights), a local folder or a hub id; openai: the served model name
    generation: Generation
    prefill: bool = False  # hf only: start the assistant turn with the prompts file's `prefill`
    batch_size: int = 32  # hf only: requests per generate call (they share one prefix forward)
    base_url: str | None = None  # openai only
    api_key_env: str | None = None  # openai only: the NAME of the environment variable holding the key
    timeout_s: float = 60.0  # openai only: per request
    max_concurrency: int = 8  # openai only: requests in flight


@dataclass(frozen=True)
class WeightConfig:
    mu: float = 1.0
    sigma: float = math.sqrt(0.1)
    clip: tuple[float, float] = (0.75, 1.25)


@dataclass(frozen=True)
class RequestRetry:
    """Retries of one HTTP request on 429, 5xx, timeouts and connection errors (openai backend)."""

    max_retries: int = 6
    backoff_s: float = 1.0  # first wait; doubles each retry
    max_backoff_s: float = 30.0  # also caps a server's Retry-After


@dataclass(frozen=True)
class ScoreConfig:
    judges: tuple[JudgeConfig, ...]
    rounds: int = 5
    retries: int = 2  # re-asks of a judge whose answer is malformed, before it is recorded as missing
    request_retry: RequestRetry = field(default_factory=RequestRetry)
    weights: WeightConfig = field(default_factory=WeightConfig)
    prompts: str = DEFAULT_PROMPTS
    cache: str = DEFAULT_CACHE


_JUDGE_KEYS = {
    "name", "role", "backend", "model", "max_new_tokens", "temperature", "extra_body", "prefill",
    "batch_size", "base_url", "api_key_env", "timeout_s", "max_concurrency",
}
_HF_ONLY = {"prefill", "batch_size"}
_OPENAI_ONLY = {"base_url", "api_key_env", "timeout_s", "max_concurrency", "extra_body"}
_SCORE_KEYS = {"judges", "rounds", "retries", "request_retry", "weights", "prompts", "cache"}


def _check_keys(where: str, given: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise PanelConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _int(where: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PanelConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(where: str, value: Any, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PanelConfigError(f"{where} must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise PanelConfigError(f"{where} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def _str(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PanelConfigError(f"{where} must be a non-empty string, got {value!r}")
    return value


def parse_judge(raw: Any, index: int) -> JudgeConfig:
    where = f"score.judges[{index}]"
    if not isinstance(raw, dict):
        raise PanelConfigError(f"{where} must be a mapping, got {raw!r}")
    _check_keys(where, raw, _JUDGE_KEYS)
    for key in ("name", "role", "backend", "model"):
        if key not in raw:
            raise PanelConfigError(f"{where}: `{key}` is required")
    name = _str(f"{where}.name", raw["name"])
    where = f"score.judges[{index}] ({name})"
    backend = raw["backend"]
    if backend not in BACKENDS:
        raise PanelConfigError(f"{where}.backend must be one of {list(BACKENDS)}, got {backend!r}")
    wrong = sorted(set(raw) & (_OPENAI_ONLY if backend == "hf" else _HF_ONLY))
    if wrong:
        raise PanelConfigError(f"{where}: key(s) {wrong} do not apply to backend {backend!r}")
    extra_body = raw.get("extra_body", {}) or {}
    if not isinstance(extra_body, dict):
        raise PanelConfigError(f"{where}.extra_body must be a mapping, got {extra_body!r}")
    generation = Generation(
        max_new_tokens=_int(f"{where}.max_new_tokens", raw.get("max_new_tokens", 48), 1),
        temperature=_float(f"{where}.temperature", raw.get("temperature", 0.0), 0.0),
        extra_body=dict(extra_body),
    )
    prefill = raw.get("prefill", False)
    if not isinstance(prefill, bool):
        raise PanelConfigError(f"{where}.prefill must be true or false, got {prefill!r}")
    judge = JudgeConfig(
        name=name,
        role=_str(f"{where}.role", raw["role"]),
        backend=backend,
        model=_str(f"{where}.model", raw["model"]),
        generation=generation,
        prefill=prefill,
        batch_size=_int(f"{where}.batch_size", raw.get("batch_size", 32), 1),
        base_url=raw.get("base_url"),
        api_key_env=raw.get("api_key_env"),
        timeout_s=_float(f"{where}.timeout_s", raw.get("timeout_s", 60.0), 0.0, strict=True),
        max_concurrency=_int(f"{where}.max_concurrency", raw.get("max_concurrency", 8), 1),
    )
    if backend == "openai":
        _str(f"{where}.base_url", judge.base_url)
        env = _str(f"{where}.api_key_env", judge.api_key_env)
        if not env.replace("_", "").isalnum():
            # A key pasted here by mistake must not end up in params.yaml, dvc.lock and every log.
            raise PanelConfigError(
                f"{where}.api_key_env must be the NAME of an environment variable (letters, digits, _), "
                "not the key itself"
            )
    return judge


def parse_score_config(raw: Any) -> ScoreConfig:
    """Parse and validate the `score:` section of params.yaml."""
    if not isinstance(raw, dict):
        raise PanelConfigError(f"score: expected a mapping, got {raw!r}")
    _check_keys("score", raw, _SCORE_KEYS)
    judges_raw = raw.get("judges")
    if not isinstance(judges_raw, list) or not judges_raw:
        raise PanelConfigError("score.judges must be a non-empty list of judges")
    judges = tuple(parse_judge(j, i) for i, j in enumerate(judges_raw))
    names = [j.name for j in judges]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PanelConfigError(f"score.judges: duplicate judge name(s) {duplicates}")

    retry_raw = raw.get("request_retry", {}) or {}
    if not isinstance(retry_raw, dict):
        raise PanelConfigError(f"score.request_retry must be a mapping, got {retry_raw!r}")
    _check_keys("score.request_retry", retry_raw, {"max_retries", "backoff_s", "max_backoff_s"})
    defaults = RequestRetry()
    request_retry = RequestRetry(
        max_retries=_int("score.request_retry.max_retries", retry_raw.get("max_retries", defaults.max_retries), 0),
        backoff_s=_float("score.request_retry.backoff_s", retry_raw.get("backoff_s", defaults.backoff_s), 0.0),
        max_backoff_s=_float(
            "score.request_retry.max_backoff_s", retry_raw.get("max_backoff_s", defaults.max_backoff_s), 0.0
        ),
    )

    weights_raw = raw.get("weights", {}) or {}
    if not isinstance(weights_raw, dict):
        raise PanelConfigError(f"score.weights must be a mapping, got {weights_raw!r}")
    _check_keys("score.weights", weights_raw, {"mu", "sigma", "clip"})
    wd = WeightConfig()
    clip = weights_raw.get("clip", list(wd.clip))
    if not isinstance(clip, (list, tuple)) or len(clip) != 2:
        raise PanelConfigError(f"score.weights.clip must be [low, high], got {clip!r}")
    low = _float("score.weights.clip[0]", clip[0], 0.0)
    high = _float("score.weights.clip[1]", clip[1], 0.0)
    if not low < high:
        raise PanelConfigError(f"score.weights.clip must have low < high, got {clip!r}")
    weights = WeightConfig(
        mu=_float("score.weights.mu", weights_raw.get("mu", wd.mu), 0.0, strict=True),
        sigma=_float("score.weights.sigma", weights_raw.get("sigma", wd.sigma), 0.0),
        clip=(low, high),
    )
    if not low <= weights.mu <= high:
        raise PanelConfigError(f"score.weights.mu ({weights.mu}) must lie inside clip {clip!r}")

    return ScoreConfig(
        judges=judges,
        rounds=_int("score.rounds", raw.get("rounds", 5), 1),
        retries=_int("score.retries", raw.get("retries", 2), 0),
        request_retry=request_retry,
        weights=weights,
        prompts=_str("score.prompts", raw.get("prompts", DEFAULT_PROMPTS)),
        cache=_str("score.cache", raw.get("cache", DEFAULT_CACHE)),
    )
