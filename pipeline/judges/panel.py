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
    structured_output: str = "none"  # openai only: how the answer's JSON schema is requested
    sampling_fields: dict[str, str | None] = field(default_factory=dict)  # openai only: renamed / dropped fields

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                               "extra_body": self.extra_body}
        # Only when set, so that the cache keys of judges configured before these options existed stay valid.
        if self.structured_output != "none":
            out["structured_output"] = self.structured_output
        if self.sampling_fields:
            out["sampling_fields"] = dict(sorted(self.sampling_fields.items()))
        return out


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
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The sampling fields of a chat-completions request that `sampling_fields` may rename or drop.
SAMPLING_FIELDS = ("max_tokens", "temperature")
# Request fields the backend sets itself: a sampling field must not be renamed to one of them.
_RESERVED_FIELDS = ("model", "messages", "response_format", "guided_json", "stream", "n", "max_tokens",
                    "temperature")


class OpenAIJudgeConfig(_JudgeBase):
    """Any OpenAI-compatible chat-completions endpoint (vLLM, hosted APIs)."""

    backend: Literal["openai"] = Field(description="openai: an OpenAI-compatible HTTP endpoint")
    base_url: NonEmpty = Field(description="the endpoint, e.g. http://localhost:8000/v1")
    api_key_env: NonEmpty = Field(description="the NAME of the environment variable that holds the API key")
    timeout_s: float = Field(gt=0.0, description="per-request timeout in seconds")
    max_concurrency: int = Field(ge=1, description="requests in flight at once")
    extra_body: dict[str, Any] = Field(description="passed to the server as is (e.g. vLLM sampling options); {} for none")
    preflight: bool = Field(
        description="before any judging, GET {base_url}/models once: fail in seconds if the server is unreachable, "
        "refuses the key or does not serve `model`; false for a server without a /models endpoint"
    )
    structured_output: Literal["none", "response_format", "guided_json"] = Field(
        description="how the answer's JSON schema is requested: none; response_format (the OpenAI API's "
        "json_schema: current vLLM, llama.cpp, hosted APIs); guided_json (vLLM before 0.12)"
    )
    sampling_fields: dict[str, NonEmpty | None] = Field(
        description="rename (new name) or drop (null) the request's max_tokens / temperature, e.g. "
        "{max_tokens: max_completion_tokens, temperature: null} for reasoning models; {} sends both as is"
    )

    @property
    def generation(self) -> Generation:
        return Generation(self.max_new_tokens, self.temperature, dict(self.extra_body), self.structured_output,
                          dict(self.sampling_fields))

    @field_validator("base_url")
    @classmethod
    def _is_a_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            # Without a scheme the client cannot even connect, and would retry for minutes.
            raise ValueError(
                f"must start with http:// or https:// followed by a host (e.g. http://localhost:8000/v1), got {value!r}"
            )
        if re.search(r"/(chat/completions|completions|models)/?$", value):
            raise ValueError(
                f"is the API root (e.g. http://localhost:8000/v1), not an endpoint under it, got {value!r}"
            )
        return value

    @field_validator("sampling_fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str | None]) -> dict[str, str | None]:
        unknown = sorted(set(value) - set(SAMPLING_FIELDS))
        if unknown:
            raise ValueError(f"can rename or drop only {list(SAMPLING_FIELDS)}, not {unknown}")
        for old, new in value.items():
            if new is None:
                continue
            if not _FIELD_NAME.match(new):
                raise ValueError(f"{old}: the new name must be a request field name (letters, digits, _), got {new!r}")
            if new in _RESERVED_FIELDS and new != old:
                raise ValueError(f"{old}: cannot be renamed to {new!r}, a field the request already has")
        return value

    @model_validator(mode="after")
    def _no_clashes(self) -> OpenAIJudgeConfig:
        schema_key = {"response_format": "response_format", "guided_json": "guided_json"}.get(self.structured_output)
        if schema_key and schema_key in self.extra_body:
            raise ValueError(
                f"judge {self.name}: structured_output: {self.structured_output} sets `{schema_key}`; "
                f"remove it from extra_body"
            )
        sent = [new for new in self.sampling_fields.values() if new is not None]
        clash = sorted(set(sent) & set(self.extra_body))
        if clash:
            raise ValueError(f"judge {self.name}: sampling_fields renames to {clash}, which extra_body also sets")
        return self

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
    max_consecutive_failures: int = Field(
        ge=1,
        description="requests in a row that fail for good (after every retry, or a 400) before the judge's turn "
        "is stopped; the first 401/403/404 and a connection error outlasting the retries stop it at once",
    )


class RationaleConfig(Config):
    """CheXPO counterfactual rationales (docs/judges.md): one judge explains each chosen answer and argues for
    each dispreferred one."""

    enabled: bool = Field(
        description="ask for a rationale per entry and a counterfactual rationale per dispreferred response, "
        "after the judging (columns `rationale`, `counterfactuals`); false leaves both null"
    )
    judge: NonEmpty = Field(
        description="the `name` of the panel judge whose backend, cache and temperature write them "
        "(checked when enabled)"
    )
    max_new_tokens: int = Field(ge=1, description="cap on one rationale's length, in tokens")


class ScoreConfig(Config):
    """The `score:` section: the judge panel, the consensus protocol and the weights."""

    judges: tuple[JudgeConfig, ...] = Field(strict=False, description="the panel: a list of judges")
    rounds: int = Field(ge=1, description="consensus rounds (MMedPO: 5)")
    retries: int = Field(ge=0, description="re-asks after a malformed answer, then the turn is recorded as missing")
    max_unscored: float = Field(
        ge=0.0, le=1.0,
        description="largest share of dispreferred responses that may end without any valid score (weight mu); "
        "more fails the stage (exit 1) after writing its report; 1 never fails",
    )
    request_retry: RequestRetry = Field(description="HTTP retries of the openai backend")
    weights: WeightConfig = Field(description="how consensus scores become weights")
    prompts: NonEmpty = Field(description="the versioned prompts file (a dep of the score stage)")
    rationales: RationaleConfig = Field(description="CheXPO counterfactual rationales by one judge of the panel")

    @model_validator(mode="after")
    def _panel(self) -> ScoreConfig:
        if not self.judges:
            raise ValueError("score.judges must list at least one judge")
        names = [j.name for j in self.judges]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"score.judges: duplicate judge name(s) {duplicates}")
        # Only when enabled: a panel swapped for other judges need not touch an unused key.
        if self.rationales.enabled and self.rationales.judge not in names:
            raise ValueError(
                f"score.rationales.judge {self.rationales.judge!r} is not a judge of the panel (score.judges "
                f"names: {names})"
            )
        return self


def parse_score_config(raw: Any) -> ScoreConfig:
    """Validate a `score:` mapping built in code (the stage uses `pipeline.params.load_config`)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"score: expected a mapping, got {raw!r}")
    return build_config(ScoreConfig, raw, "score")
