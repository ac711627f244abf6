"""The `mine` stage's library: choosing the entries of the training split that preferences are built from.

A strategy takes VQA rows (`pipeline.schema.VQA_SCHEMA`) and returns pool rows
(`POOL_SCHEMA`): the chosen entries plus `mine_strategy` and `mine_score` (a hardness score
where the strategy computes one, else null).

Strategies live in `STRATEGIES`, keyed by the name `params.yaml` uses (`mine.strategy`).
Strategies that need settings of their own will get a sub-section of `mine:` named after them.

- `random`: a seeded uniform draw without replacement (HSCR §4.1 builds its preferences from a
  random 2K subset). Asking for more entries than the split holds takes the whole split; the
  stage reports it (`capped` in its metrics) and warns, rather than failing, so small
  demonstration profiles can use the same `size` as a full run.
- `hard` (CheXPO hard-example mining, docs/design.md § "Hard-example mining") is planned, not implemented: asking for it
  raises `NotImplementedError`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from pydantic import Field, field_validator

from pipeline.errors import DataError
from pipeline.params import Config

# Strategies that have a reserved name but no implementation yet, with what they will do.
PLANNED_STRATEGIES = {
    "hard": "CheXPO-style hard-example mining, docs/design.md § 'Hard-example mining'",
}


class MiningStrategy(Protocol):
    """Chooses pool entries from VQA rows."""

    name: str

    def select(self, rows: Sequence[Mapping[str, Any]], size: int, seed: int, **options: Any) -> list[dict]:
        """Return at most `size` rows of `rows` as POOL_SCHEMA rows (with `mine_strategy`, `mine_score`)."""
        ...


def _check_ids_unique(rows: Sequence[Mapping[str, Any]]) -> None:
    # Every later stage joins on `id`; a duplicate would silently pair one entry's candidates
    # with another's image.
    counts = Counter(row["id"] for row in rows)
    duplicates = [key for key, n in counts.items() if n > 1]
    if duplicates:
        raise DataError(f"input has duplicate ids ({len(duplicates)}), e.g. {duplicates[:5]}")


def _check_request(name: str, rows: Sequence[Mapping[str, Any]], size: int, options: Mapping[str, Any]) -> None:
    """What every option-less strategy checks before drawing."""
    if options:
        raise ValueError(f"strategy {name!r} takes no options, got {sorted(options)}")
    if size < 1:
        raise ValueError(f"mine size must be >= 1, got {size}")
    if not rows:
        raise DataError("no rows to mine from: the input split is empty; check `prepare` (reports/prepare.json)")
    _check_ids_unique(rows)


class RandomStrategy:
    """Uniform draw without replacement from a seeded `random.Random`; rows keep their input order."""

    name = "random"

    def select(self, rows: Sequence[Mapping[str, Any]], size: int, seed: int, **options: Any) -> list[dict]:
        _check_request(self.name, rows, size, options)
        n = min(size, len(rows))
        # Sorting the drawn indices keeps the pool in input order, so pools drawn with the same
        # seed from the same split are byte-identical and easy to diff.
        chosen = sorted(random.Random(seed).sample(range(len(rows)), n))
        return [{**rows[i], "mine_strategy": self.name, "mine_score": None} for i in chosen]


class BalancedStrategy:
    """Seeded draw spread evenly over (question, answer) strata, round-robin.

    A uniform draw inherits the train split's language prior (e.g. 70% "no" to a presence
    question); preference pairs built from it then teach "prefer the majority answer", which a
    model with weak visual features learns instead of looking (measured: docs/results.md).
    """

    name = "balanced"

    def select(self, rows: Sequence[Mapping[str, Any]], size: int, seed: int, **options: Any) -> list[dict]:
        from pipeline.metrics import normalize_answer

        _check_request(self.name, rows, size, options)
        rng = random.Random(seed)
        strata: dict[tuple[str, str], list[int]] = {}
        for i, row in enumerate(rows):
            strata.setdefault((row["question"], normalize_answer(row["answer"])), []).append(i)
        queues = [rng.sample(members, len(members)) for _, members in sorted(strata.items())]
        chosen: list[int] = []
        while len(chosen) < min(size, len(rows)):
            for queue in queues:
                if queue and len(chosen) < size:
                    chosen.append(queue.pop())
        return [{**rows[i], "mine_strategy": self.name, "mine_score": None} for i in sorted(chosen)]


STRATEGIES: dict[str, MiningStrategy] = {"random": RandomStrategy(), "balanced": BalancedStrategy()}


def get_strategy(name: str) -> MiningStrategy:
    """The strategy registered as `name`; a clear error naming the available ones otherwise."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    available = ", ".join(sorted(STRATEGIES))
    if name in PLANNED_STRATEGIES:
        raise NotImplementedError(
            f"mining strategy {name!r} ({PLANNED_STRATEGIES[name]}) is not implemented yet; "
            f"available strategies: {available}"
        )
    raise ValueError(f"unknown mining strategy {name!r}; available strategies: {available}")


class MineConfig(Config):
    """The `mine:` section."""

    strategy: Literal["balanced", "random", "hard"] = Field(
        description="balanced: even over question x answer | random: uniform | hard: CheXPO (not implemented yet)"
    )
    size: int = Field(ge=1, description="entries in the pool (HSCR: 2,000; capped at the split's size)")
    seed: int = Field(ge=0, description="seeds the draw")

    @field_validator("strategy")
    @classmethod
    def _implemented(cls, value: str) -> str:
        if value in PLANNED_STRATEGIES:
            raise ValueError(
                f"{value!r} ({PLANNED_STRATEGIES[value]}) is not implemented yet; use one of {sorted(STRATEGIES)}"
            )
        return value


def mine(rows: Sequence[Mapping[str, Any]], config: MineConfig) -> tuple[list[dict], dict[str, Any]]:
    """Run the configured strategy; return the pool rows and the stage's metrics."""
    strategy = get_strategy(config.strategy)
    pool = strategy.select(rows, config.size, config.seed)
    return pool, mining_summary(pool, requested=config.size, available=len(rows), config=config)


def mining_summary(
    pool: Sequence[Mapping[str, Any]], requested: int, available: int, config: MineConfig
) -> dict[str, Any]:
    """Metrics for `reports/mine.json`: sizes (and whether the request was capped) and counts per group."""
    scores = [row["mine_score"] for row in pool if row["mine_score"] is not None]
    return {
        "strategy": config.strategy,
        "seed": config.seed,
        "requested_size": requested,
        "available": available,
        "size": len(pool),
        "capped": len(pool) < requested,
        "mean_mine_score": sum(scores) / len(scores) if scores else None,
        "modality": dict(sorted(Counter(row["modality"] for row in pool).items())),
        "answer_type": dict(sorted(Counter(row["answer_type"] for row in pool).items())),
        "question_type": dict(sorted(Counter(row["question_type"] for row in pool).items())),
        "dataset": dict(sorted(Counter(row["dataset"] for row in pool).items())),
    }
