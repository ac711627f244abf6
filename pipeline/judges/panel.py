"""The judge panel and the rest of the `score:` section of params.yaml, as typed configs.

Every key is checked by `pipeline.params.load_config` before any model is loaded or any request
is sent, so a typo in params.yaml fails in a second with a message naming the key, not after an
hour of judging. A judge is an `HFJudgeConfig` or an `OpenAIJudgeConfig`, told apart by its
`backend`; each lists exactly the keys that apply to its backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.errors import ParamsError
from pipeline.params import Config, build_config

BACKENDS = ("hf", "openai")


class PanelConfigError(ParamsError):
    """The panel does not fit the prompts file (a role it lacks, prefill without a prefill text)."""


@dataclass(frozen=True)
class Generation:
    """Decoding settings of one judge; part of the cache key, so changing one asks again."""

    max_new_tokens: int
    temperature: float  # 0 = greedy (hf) / temperature 0 (openai): reproducible verdicts
    extra_body: dict[str, Any] = field(default_factory=dict)  # openai only: passed to the server as is

    def as_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "extra_body": self.extra_body}


NonEmpty = Annotated[str, Field(min_length=1, pattern=r"\S")]


class _JudgeBase(Config):
    name: NonEmpty = Field(description="the judge's name in transcripts and metrics; unique in the panel")
    role: NonEmpty = Field(description="a key of `roles:` in the prompts file: the judge's system prompt")
    model: NonEmpty = Field(
        description="hf: `smollm2` (packaged offline weights), a folder under models/judges or a hub id; "
        "openai: the served model name"
    )
    max_new_tokens: int = Field(ge=1, description="cap on the judge's answer length, in tokens")
    temperature: float = Field(ge=0.0, description="decoding temperature; 0 = greedy, reproducible verdicts")

    @property
    def generation(self) -> Generation:
        return Generation(self.max_new_tokens, self.temperature)


class HFJudgeConfig(_JudgeBase):
    """A local transformers chat model, batched greedy generation."""

    backend: Literal["hf"] = Field(description="hf: a local transformers causal LM")
    prefill: bool = Field(description="start the assistant turn with the prompts file's `prefill` text")
    batch_size: int = Field(ge=1, description="requests per generate call (they share one prefix forward)")


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class OpenAIJudgeConfig(_JudgeBase):
    """Any OpenAI-compatible chat-completions endpoint (vLLM, hosted APIs)."""

    backend: Literal["openai"] = Field(description="openai: an OpenAI-compatible HTTP endpoint")
    base_url: NonEmpty = Field(description="the endpoint, e.g. http://localhost:8000/v1")
    api_key_env: NonEmpty = Field(description="the NAME of the environment variable that holds the API key")
    timeout_s: float = Field(gt=0.0, description="per-request timeout in seconds")
    max_concurrency: int = Field(ge=1, description="requests in flight at once")
    extra_body: dict[str, Any] = Field(description="passed to the server as is (e.g. vLLM sampling options); {} for none")

    @property
    def generation(self) -> Generation:
        return Generation(self.max_new_tokens, self.temperature, dict(self.extra_body))

    @field_validator("api_key_env")
    @classmethod
    def _is_a_name(cls, value: str) -> str:
        if not _ENV_NAME.match(value):
            # A key pasted here by mistake must not end up in params.yaml, dvc.lock and every log.
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits, _), not the key itself"
            )
        return value


JudgeConfig = Annotated[HFJudgeConfig | OpenAIJudgeConfig, Field(discriminator="backend")]


class WeightConfig(Config):
    """Consensus scores -> DPO weights (MMedPO §3.3): z-score, then mu + sigma * z, clipped."""

    mu: float = Field(gt=0.0, description="mean weight")
    sigma: float = Field(ge=0.0, description="spread of the weights (MMedPO: sqrt(0.1))")
    clip: tuple[float, float] = Field(strict=False, description="[low, high] bounds of a weight, 0 <= low < high")

    @model_validator(mode="after")
    def _bounds(self) -> WeightConfig:
        low, high = self.clip
        if low < 0 or not low < high:
            raise ValueError(f"weights.clip must be [low, high] with 0 <= low < high, got {list(self.clip)}")
        if not low <= self.mu <= high:
            raise ValueError(f"weights.mu ({self.mu}) must lie inside clip {list(self.clip)}")
        return self


class RequestRetry(Config):
    """Retries of one HTTP request on 429, 5xx, timeouts and connection errors (openai backend)."""

    max_retries: int = Field(ge=0, description="retries of one request before the judge fails")
    backoff_s: float = Field(ge=0.0, description="first wait in seconds; doubles each retry")
    max_backoff_s: float = Field(ge=0.0, description="cap on one wait, also on a server's Retry-After")


class ScoreConfig(Config):
    """The `score:` section: the judge panel, the consensus protocol and the weights."""

    judges: tuple[JudgeConfig, ...] = Field(strict=False, description="the panel: a list of judges")
    rounds: int = Field(ge=1, description="consensus rounds (MMedPO: 5)")
    retries: int = Field(ge=0, description="re-asks after a malformed answer, then the turn is recorded as missing")
    request_retry: RequestRetry = Field(description="HTTP retries of the openai backend")
    weights: WeightConfig = Field(description="how consensus scores become weights")
    prompts: NonEmpty = Field(description="the versioned prompts file (a dep of the score stage)")

    @model_validator(mode="after")
    def _panel(self) -> ScoreConfig:
        if not self.judges:
            raise ValueError("score.judges must list at least one judge")
        names = [j.name for j in self.judges]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"score.judges: duplicate judge name(s) {duplicates}")
        return self


def parse_score_config(raw: Any) -> ScoreConfig:
    """Validate a `score:` mapping built in code (the stage uses `pipeline.params.load_config`)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"score: expected a mapping, got {raw!r}")
    return build_config(ScoreConfig, raw, "score")
