"""Statistics for comparing evaluation runs: bootstrap intervals, paired tests, spread over seeds.

The unit of every interval and test here is the test item (one question): the test split is a
sample of the questions a model could be asked, and that sampling is the noise a reviewer asks
about first. The spread over training seeds is the other source of noise; `over_seeds` reports
it as a mean and a sample standard deviation.

- `bootstrap_ci`: a BCa bootstrap interval of the mean over items (`scipy.stats.bootstrap`).
  BCa (bias-corrected and accelerated) rather than percentile: it corrects the bootstrap
  distribution's bias and skewness, which matter for proportions near 0 or 1 (a closed accuracy
  of 90%, an image reliance near 0) and for a few hundred items, and it is second-order accurate
  where the percentile interval is first-order; its jackknife costs n evaluations of a mean,
  nothing at this size. BCa is undefined on constant data (every resample gives the same mean),
  so constant scores give the degenerate interval [mean, mean], and a BCa interval that still
  comes out undefined (a nearly constant tiny sample) falls back to the percentile interval; the
  method used is recorded in the result.
- `mcnemar_test`: closed questions (scores 0/1) of a model A against a baseline B on the same
  items: the exact McNemar test, a two-sided binomial test (p = 1/2) on the discordant pairs.
- `permutation_test_paired`: open recall (scores in [0, 1]) or any other per-item score: a paired
  permutation test of the mean difference (`scipy.stats.permutation_test` with
  `permutation_type="samples"`, i.e. A and B swapped within items, which flips the sign of each
  item's difference). Exact (every 2^n swap pattern) when 2^n <= `resamples`.
- Both paired tests report the mean difference A − B and its bootstrap interval, resampling items
  jointly (the interval of the mean of the per-item differences).

Every randomized function takes an explicit `seed`: the same inputs and seed give the same output.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from pipeline.errors import DataError

DEFAULT_RESAMPLES = 9999
DEFAULT_CONFIDENCE = 0.95
ALPHA = 0.05

MCNEMAR = "exact McNemar"
PERMUTATION = "paired permutation"


@dataclass(frozen=True)
class ConfidenceInterval:
    """A confidence interval of a mean over `n` items.

    `method` is the one actually used: "BCa", "percentile" (BCa was undefined) or "degenerate"
    (constant scores: the interval is the mean itself).
    """

    mean: float
    low: float
    high: float
    confidence: float
    method: str
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedTest:
    """Model A against baseline B on the same `n` items.

    `difference` is mean(A) − mean(B) (= the mean of the per-item differences), `ci` its bootstrap
    interval with items resampled jointly, `p_value` the two-sided p-value of `test`.
    `discordant` is (A right and B wrong, A wrong and B right) for the McNemar test, else None.
    """

    test: str
    n: int
    mean_a: float
    mean_b: float
    difference: float
    ci: ConfidenceInterval
    p_value: float
    discordant: tuple[int, int] | None = None

    def significant(self, alpha: float = ALPHA) -> bool:
        """Whether the difference is significant at level `alpha` (p < alpha)."""
        return self.p_value < alpha

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci"] = self.ci.to_dict()
        out["discordant"] = list(self.discordant) if self.discordant is not None else None
        return out


@dataclass(frozen=True)
class SeedSummary:
    """A metric over training seeds: its mean and sample standard deviation (ddof=1; None with
    a single seed, where the spread is unknown), and the number of seeds."""

    mean: float
    std: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_scores(scores: Sequence[float] | np.ndarray, what: str = "scores") -> np.ndarray:
    x = np.asarray(scores, dtype=float)
    if x.ndim != 1:
        raise DataError(f"{what}: expected a flat list of per-item scores, got shape {x.shape}")
    if x.size == 0:
        raise DataError(f"{what}: no items; an interval needs at least one score")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{what}: {int(np.sum(~np.isfinite(x)))} scores are NaN or infinite")
    return x


def bootstrap_ci(
    scores: Sequence[float] | np.ndarray,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    *,
    seed: int,
) -> ConfidenceInterval:
    """Bootstrap confidence interval of the mean of per-item `scores` (BCa; see the module doc).

    `resamples` bootstrap samples are drawn with `numpy.random.default_rng(seed)`: the same
    scores and seed give the same interval. Constant scores (a single item included) give the
    degenerate interval [mean, mean]; where BCa is undefined the percentile interval is used.
    """
    x = _as_scores(scores)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    mean = float(np.mean(x))
    if np.ptp(x) == 0:  # BCa's acceleration is 0/0 here, and every resample gives the mean anyway
        return ConfidenceInterval(mean, mean, mean, confidence, "degenerate", int(x.size))
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            # scipy warns (and returns NaN) where BCa is undefined; the fallback handles it.
            warnings.simplefilter("ignore")
            result = stats.bootstrap(
                (x,), np.mean, n_resamples=resamples, confidence_level=confidence, method=method,
                vectorized=True, rng=np.random.default_rng(seed),
            )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            # Floating-point rounding can put a bound a hair past the mean: snap it back.
            low = mean if 0 < low - mean < 1e-12 else low
            high = mean if 0 < mean - high < 1e-12 else high
            return ConfidenceInterval(mean, low, high, confidence, method, int(x.size))
    return ConfidenceInterval(mean, mean, mean, confidence, "degenerate", int(x.size))


def paired_scores(
    a: Mapping[str, float], b: Mapping[str, float], names: tuple[str, str] = ("A", "B")
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Align two id → score mappings on their item ids (sorted); fail when the ids differ.

    The error names the ids only one side has (the first ten of each), so a run evaluated on
    another test split, or a truncated one (`evaluate.max_rows`), is caught before any test.
    """
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        def show(ids: list[str]) -> str:
            return ", ".join(ids[:10]) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "") if ids else "none"

        raise DataError(
            f"{names[0]} and {names[1]} do not cover the same test items, so they cannot be paired: "
            f"only in {names[0]}: {show(only_a)}; only in {names[1]}: {show(only_b)}. Evaluate both on "
            "the same test split (and the same evaluate.max_rows)"
        )
    if not a:
        raise DataError(f"{names[0]} and {names[1]}: no items to compare")
    ids = sorted(a)
    return ids, _as_scores([a[i] for i in ids], names[0]), _as_scores([b[i] for i in ids], names[1])


def mcnemar_test(
    a: Mapping[str, float],
    b: Mapping[str, float],
    *,
    seed: int,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    names: tuple[str, str] = ("A", "B"),
) -> PairedTest:
    """Exact McNemar test of A against B on the same closed questions (id → score 0 or 1).

    Only the discordant pairs carry information: under the null hypothesis each is equally likely
    to favour A or B, so the p-value is the two-sided binomial test (p = 1/2) of the number that
    favour A among them; no discordant pair gives p = 1. The difference's interval is a paired
    bootstrap (`bootstrap_ci` of the per-item differences, `seed`).
    """
    _, x, y = paired_scores(a, b, names)
    for name, s in zip(names, (x, y), strict=True):
        if not np.all((s == 0) | (s == 1)):
            raise DataError(f"{name}: the McNemar test needs 0/1 scores (closed questions); use "
                            "permutation_test_paired for scores in [0, 1]")
    a_only, b_only = int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1)))
    discordant = a_only + b_only
    p = float(stats.binomtest(a_only, discordant, 0.5, alternative="two-sided").pvalue) if discordant else 1.0
    return PairedTest(MCNEMAR, int(x.size), float(x.mean()), float(y.mean()), float(np.mean(x - y)),
                      bootstrap_ci(x - y, confidence, resamples, seed=seed), p, (a_only, b_only))


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def permutation_test_paired(
    a: Mapping[str, float],
    b: Mapping[str, float],
    *,
    seed: int,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    names: tuple[str, str] = ("A", "B"),
) -> PairedTest:
    """Paired permutation test of A against B on the same items (id → score, any real scores).

    The statistic is the mean difference A − B; the null distribution swaps A and B within items
    (`permutation_type="samples"`), all 2^n ways when 2^n <= `resamples` (an exact test), else
    `resamples` random swaps drawn with `numpy.random.default_rng(seed)`. Two-sided. The
    difference's interval is a paired bootstrap with the same seed.
    """
    _, x, y = paired_scores(a, b, names)
    if np.all(x == y) or x.size == 1:
        # Every swap gives the observed statistic, or (one item) the swaps give +d and −d: the
        # two-sided p-value is 1 (and scipy needs two items).
        p = 1.0
    else:
        result = stats.permutation_test(
            (x, y), _mean_difference, permutation_type="samples", vectorized=True, n_resamples=resamples,
            alternative="two-sided", rng=np.random.default_rng(seed),
        )
        p = min(1.0, float(result.pvalue))
    return PairedTest(PERMUTATION, int(x.size), float(x.mean()), float(y.mean()), float(np.mean(x - y)),
                      bootstrap_ci(x - y, confidence, resamples, seed=seed), p)


def over_seeds(values: Sequence[float]) -> SeedSummary:
    """Mean and sample standard deviation (ddof=1) of a metric over runs with different seeds;
    the standard deviation is None for a single seed."""
    x = _as_scores(values, "values over seeds")
    return SeedSummary(float(x.mean()), float(np.std(x, ddof=1)) if x.size > 1 else None, int(x.size))
