"""Balanced allocation: what a mined pool keeps the split's mix of, and how slots are shared out.

Used by the `balanced` strategy (pipeline/mining.py) and by CheXPO hard mining
(pipeline/hard_mining.py), so both balance over the same fields the same way.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

# A pool keeps the split's shares of these fields' combinations ("cells").
BALANCE_FIELDS = ("answer_type", "modality", "question_type")


def cell_of(row: Mapping[str, Any]) -> tuple[str, ...]:
    """The row's (answer_type, modality, question_type)."""
    return tuple(str(row[f]) for f in BALANCE_FIELDS)


def apportion(total: int, sizes: Mapping[Any, int], rng: random.Random) -> dict[Any, int]:
    """Split `total` over groups in proportion to `sizes` (largest remainder; ties broken by `rng`).

    With `total <= sum(sizes)` no group gets more than its size.
    """
    whole = sum(sizes.values())
    exact = {g: total * n / whole for g, n in sizes.items()}
    quota = {g: int(x) for g, x in exact.items()}
    order = sorted(sizes, key=lambda g: (-(exact[g] - quota[g]), rng.random()))
    for g in order[: total - sum(quota.values())]:
        quota[g] += 1
    return quota
