"""The `mine` stage's library: choosing the entries of the training split that preferences are built from.

A strategy takes VQA rows (`pipeline.schema.VQA_SCHEMA`) and returns pool rows
(`POOL_SCHEMA`): the chosen entries plus `mine_strategy`, `mine_score` (a hardness score where
the strategy computes one, else null) and `mine_reason` (why, where the strategy says).

The strategies that need no model live in `STRATEGIES`, keyed by the name `params.yaml` uses
(`mine.strategy`):

- `random`: a seeded uniform draw without replacement (HSCR §4.1 builds its preferences from a
  random 2K subset). Asking for more entries than the split holds takes the whole split; the
  stage reports it (`capped` in its metrics) and warns, rather than failing, so small
  demonstration profiles can use the same `size` as a full run.
- `balanced` (the default): the split's mix of answer type, modality and question type, even
  over answers within it (`BalancedStrategy`).

`hard` (CheXPO's confidence-similarity mining) needs the SFT model and a sentence embedder; its
settings are the `mine.hard:` sub-section and its code is `pipeline/hard_mining.py`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from pydantic import Field

from pipeline.balance import BALANCE_FIELDS, apportion, cell_of
from pipeline.errors import DataError
from pipeline.hard_mining import HardMiningConfig
from pipeline.params import Config


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
        return [{**rows[i], "mine_strategy": self.name, "mine_score": None, "mine_reason": None} for i in chosen]


class BalancedStrategy:
    """Keeps the split's mix of answer type, modality and question type; even over answers within it.

    The pool's share of every (answer_type, modality, question_type) cell is the split's
    (`apportion`), so a split that is a quarter open questions gives a pool that is a quarter open,
    whatever the number of distinct questions. Within a cell the draw goes round-robin over the
    cell's answers in a seeded random order, each answer's rows in a seeded random order: a
    presence question answered "no" 70% of the time gives a pool that answers it "no" half the
    time, because preference pairs built on the split's language prior teach "prefer the majority
    answer", which a model with weak visual features learns instead of looking (docs/results.md).
    Where nearly every answer is distinct (open questions), this is a seeded uniform draw of the
    cell. Every choice is seeded by `seed`; the pool keeps the input order.
    """

    name = "balanced"

    def select(self, rows: Sequence[Mapping[str, Any]], size: int, seed: int, **options: Any) -> list[dict]:
        from pipeline.metrics import normalize_answer

        _check_request(self.name, rows, size, options)
        rng = random.Random(seed)
        cells: dict[tuple[str, ...], dict[str, list[int]]] = {}
        for i, row in enumerate(rows):
            cells.setdefault(cell_of(row), {}).setdefault(normalize_answer(row["answer"]), []).append(i)
        quota = apportion(min(size, len(rows)), {c: sum(map(len, a.values())) for c, a in sorted(cells.items())}, rng)
        chosen: list[int] = []
        for cell, answers in sorted(cells.items()):
            queues = [rng.sample(members, len(members)) for _, members in sorted(answers.items())]
            rng.shuffle(queues)
            taken = 0
            while taken < quota[cell]:
                for queue in queues:
                    if queue and taken < quota[cell]:
                        chosen.append(queue.pop())
                        taken += 1
        return [{**rows[i], "mine_strategy": self.name, "mine_score": None, "mine_reason": None}
                for i in sorted(chosen)]


STRATEGIES: dict[str, MiningStrategy] = {"random": RandomStrategy(), "balanced": BalancedStrategy()}


def get_strategy(name: str) -> MiningStrategy:
    """The model-free strategy registered as `name`; a clear error naming the available ones otherwise."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    available = ", ".join(sorted(STRATEGIES))
    if name == "hard":
        raise ValueError("strategy 'hard' needs the SFT model: it runs through pipeline.hard_mining (the mine "
                         f"stage does this); model-free strategies: {available}")
    raise ValueError(f"unknown mining strategy {name!r}; available strategies: {available}")


class MineConfig(Config):
    """The `mine:` section."""

    strategy: Literal["balanced", "random", "hard"] = Field(
        description="balanced: the split's answer-type/modality/question-type mix, even over answers | "
        "random: uniform | hard: CheXPO confidence-similarity mining with the SFT model (mine.hard)"
    )
    size: int = Field(ge=1, description="entries in the pool (HSCR: 2,000; capped at the split's size)")
    seed: int = Field(ge=0, description="seeds the draw")
    hard: HardMiningConfig = Field(description="settings of strategy hard (read only when it is chosen)")


def mine(rows: Sequence[Mapping[str, Any]], config: MineConfig) -> tuple[list[dict], dict[str, Any]]:
    """Run the configured model-free strategy; return the pool rows and the stage's metrics."""
    strategy = get_strategy(config.strategy)
    pool = strategy.select(rows, config.size, config.seed)
    return pool, mining_summary(pool, requested=config.size, available=len(rows), config=config, split=rows)


def mining_summary(
    pool: Sequence[Mapping[str, Any]], requested: int, available: int, config: MineConfig,
    split: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Metrics for `reports/mine.json`: sizes (and whether the request was capped), counts per
    group, and the pool's shares of each balance field beside the split's."""
    scores = [row["mine_score"] for row in pool if row["mine_score"] is not None]

    def shares(rows: Sequence[Mapping[str, Any]], field: str) -> dict[str, float]:
        counts = Counter(str(row[field]) for row in rows)
        return {k: round(v / len(rows), 4) for k, v in sorted(counts.items())} if rows else {}

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
        "composition": {f: {"pool": shares(pool, f), "split": shares(split, f)} for f in BALANCE_FIELDS},
    }
