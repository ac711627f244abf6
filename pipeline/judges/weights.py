"""Clinical-relevance scores to per-response DPO weights (MMedPO §3.3, App. B; docs/design.md § "Weights").

    z = (s - mean(s)) / std(s)            over every scored dispreferred response of the dataset
    w = clip(mu + sigma * z, low, high)   mu = 1, sigma = sqrt(0.1), [low, high] = [0.75, 1.25]

The std is the population std (ddof 0). Higher clinical relevance -> larger weight.

Edge cases, on purpose:
- all scores equal (std 0), or fewer than two scores: z = 0 for all, so every weight is mu;
  the weighted loss is then the plain DPO loss, the honest outcome when the judges do not
  discriminate.
- a missing score (every judge answer malformed): weight mu (= 1, a neutral, unweighted term).
  It takes no part in the mean and std. The count of such responses is in the stage's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipeline.judges.panel import WeightConfig


def standardize(scores: Sequence[float | None]) -> list[float | None]:
    """z-scores over the non-missing scores; None stays None; a zero spread gives z = 0."""
    present = [float(s) for s in scores if s is not None]
    if len(present) < 2:
        return [None if s is None else 0.0 for s in scores]
    mean = sum(present) / len(present)
    std = math.sqrt(sum((s - mean) ** 2 for s in present) / len(present))
    if std == 0.0:
        return [None if s is None else 0.0 for s in scores]
    return [None if s is None else (float(s) - mean) / std for s in scores]


def clinical_weights(scores: Sequence[float | None], config: WeightConfig) -> list[float]:
    """One weight per score (see the module docstring)."""
    low, high = config.clip
    weights = []
    for z in standardize(scores):
        w = config.mu if z is None else config.mu + config.sigma * z
        weights.append(min(high, max(low, w)))
    return weights


def visual_weights(rows: Sequence[dict], config: WeightConfig) -> tuple[list[dict], dict]:
    """`rows` with the `weight` of each `visual_dispreferred` set from its localizer confidence
    (MMedPO §3.2.2: the visual tool's confidence s_v, normalized like the judges' scores, over the
    visual dispreferred responses only: two kinds of score on different scales are not pooled),
    and a summary for the stage's metrics."""
    present = [r["visual_dispreferred"] for r in rows if r.get("visual_dispreferred")]
    weights = clinical_weights([v["confidence"] for v in present], config)
    by_id = {id(v): w for v, w in zip(present, weights, strict=True)}
    out = [{**r, "visual_dispreferred": {**r["visual_dispreferred"], "weight": by_id[id(r["visual_dispreferred"])]}}
           if r.get("visual_dispreferred") else r for r in rows]
    summary = {"responses": len(present),
               "mean_weight": sum(weights) / len(weights) if weights else None,
               "min_weight": min(weights) if weights else None, "max_weight": max(weights) if weights else None}
    return out, summary
