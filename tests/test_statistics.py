"""pipeline.statistics: hand-computed McNemar and permutation p-values, bootstrap intervals, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.statistics import (
    MCNEMAR,
    PERMUTATION,
    bootstrap_ci,
    mcnemar_test,
    over_seeds,
    paired_scores,
    permutation_test_paired,
)


def _ids(scores: list[float]) -> dict[str, float]:
    return {f"q{i:02d}": s for i, s in enumerate(scores)}


def test_mcnemar_exact_p_value_by_hand() -> None:
    # 20 closed questions: 8 only A gets right, 2 only B, 5 both, 5 neither.
    a = _ids([1] * 8 + [0] * 2 + [1] * 5 + [0] * 5)
    b = _ids([0] * 8 + [1] * 2 + [1] * 5 + [0] * 5)
    test = mcnemar_test(a, b, resamples=999, seed=0)
    # Two-sided binomial on 10 discordant pairs split 8/2:
    # 2 * P(X >= 8 | n=10, p=1/2) = 2 * (C(10,8) + C(10,9) + C(10,10)) / 2^10 = 2 * 56 / 1024.
    assert test.p_value == pytest.approx(2 * (45 + 10 + 1) / 1024) == pytest.approx(0.109375)
    assert test.test == MCNEMAR
    assert test.discordant == (8, 2)
    assert (test.n, test.mean_a, test.mean_b) == (20, pytest.approx(13 / 20), pytest.approx(7 / 20))
    assert test.difference == pytest.approx(6 / 20)
    assert test.ci.low <= test.difference <= test.ci.high
    assert not test.significant()  # 0.109 >= 0.05: inside the noise
    assert mcnemar_test(a, b, resamples=999, seed=0) == test  # same inputs + seed, same result


def test_mcnemar_without_discordant_pairs_and_significant_case() -> None:
    same = _ids([1, 0, 1, 1])
    test = mcnemar_test(same, same, resamples=99, seed=0)
    assert test.p_value == 1.0 and test.difference == 0.0
    assert test.ci.method == "degenerate" and test.ci.low == test.ci.high == 0.0
    # 9/0 discordant: 2 * (1/2)^9 = 1/256 < 0.05.
    a, b = _ids([1] * 9), _ids([0] * 9)
    assert mcnemar_test(a, b, resamples=99, seed=0).p_value == pytest.approx(2 / 512)
    assert mcnemar_test(a, b, resamples=99, seed=0).significant()


def test_mcnemar_rejects_scores_that_are_not_0_or_1() -> None:
    with pytest.raises(DataError, match="0/1"):
        mcnemar_test(_ids([1, 0.5]), _ids([1, 0]), seed=0)


def test_permutation_test_exact_p_value_by_hand() -> None:
    # Differences 0.25, 1.0, 0.75 (mean 2/3). Swapping A and B within an item flips the sign of its
    # difference: 2^3 = 8 equally likely sign patterns, of which only all-positive reaches a mean
    # >= 2/3 (flipping the smallest gives 1.5/3 = 0.5). One-sided 1/8, two-sided 2/8.
    a = {"a": 0.5, "b": 1.0, "c": 0.75}
    b = {"a": 0.25, "b": 0.0, "c": 0.0}
    test = permutation_test_paired(a, b, resamples=999, seed=0)
    assert test.test == PERMUTATION
    assert test.p_value == pytest.approx(0.25)
    assert test.difference == pytest.approx(2 / 3)
    assert test.discordant is None


def test_permutation_test_on_0_1_scores_equals_the_exact_mcnemar_test() -> None:
    # Differences +1, +1, +1, +1, -1: sums >= 3 need at least four +1 among 32 sign patterns:
    # C(5,4) + C(5,5) = 6, so p = 2 * 6/32 = 0.375, the same as the exact sign (McNemar) test.
    a, b = _ids([1, 1, 1, 1, 0]), _ids([0, 0, 0, 0, 1])
    assert permutation_test_paired(a, b, resamples=999, seed=0).p_value == pytest.approx(0.375)
    assert mcnemar_test(a, b, resamples=999, seed=0).p_value == pytest.approx(0.375)


def test_permutation_test_is_reproducible_with_a_seed_and_randomized_when_large() -> None:
    rng = np.random.default_rng(3)
    a, b = _ids(rng.random(60).tolist()), _ids(rng.random(60).tolist())
    first = permutation_test_paired(a, b, resamples=500, seed=7)
    assert permutation_test_paired(a, b, resamples=500, seed=7) == first
    assert 0 < first.p_value <= 1
    assert permutation_test_paired(a, a, resamples=500, seed=0).p_value == 1.0
    # One item: the swaps give +d and -d, two-sided p = 1.
    assert permutation_test_paired({"q": 1.0}, {"q": 0.0}, seed=0).p_value == 1.0


def test_paired_tests_fail_naming_the_items_only_one_side_has() -> None:
    a = {"q1": 1.0, "q2": 0.0, "q3": 1.0}
    b = {"q1": 1.0, "q2": 1.0, "q4": 0.0}
    for test in (mcnemar_test, permutation_test_paired):
        with pytest.raises(DataError, match=r"only in aligned: q3; only in sft: q4"):
            test(a, b, seed=0, names=("aligned", "sft"))
    with pytest.raises(ValueError, match="do not cover the same test items"):  # DataError is a ValueError
        paired_scores(a, b)


def test_bootstrap_ci_contains_the_mean_is_reproducible_and_shrinks_with_more_items() -> None:
    rng = np.random.default_rng(0)
    small = (rng.random(30) < 0.6).astype(float)
    large = np.tile(small, 10)  # same mean, ten times the items
    ci_small = bootstrap_ci(small, resamples=2000, seed=1)
    ci_large = bootstrap_ci(large, resamples=2000, seed=1)
    for ci in (ci_small, ci_large):
        assert ci.method == "BCa" and ci.confidence == 0.95
        assert ci.low < ci.mean < ci.high
        assert ci.mean == pytest.approx(small.mean())
    assert ci_large.high - ci_large.low < ci_small.high - ci_small.low
    # Width ~ 1/sqrt(n): ten times the items, about a third of the width.
    ratio = (ci_large.high - ci_large.low) / (ci_small.high - ci_small.low)
    assert 0.2 < ratio < 0.5
    assert bootstrap_ci(small, resamples=2000, seed=1) == ci_small
    assert bootstrap_ci(small, resamples=2000, seed=2) != ci_small
    # A wider confidence level gives a wider interval.
    wide = bootstrap_ci(small, confidence=0.99, resamples=2000, seed=1)
    assert wide.low <= ci_small.low and wide.high >= ci_small.high


def test_bootstrap_ci_of_constant_scores_is_the_mean() -> None:
    for scores in ([1.0, 1.0, 1.0], [0.0] * 50, [0.4]):
        ci = bootstrap_ci(scores, resamples=99, seed=0)
        assert ci.method == "degenerate"
        assert ci.low == ci.high == ci.mean == scores[0]


def test_randomized_functions_need_an_explicit_seed() -> None:
    with pytest.raises(TypeError, match="seed"):
        bootstrap_ci([0.0, 1.0])  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="seed"):
        permutation_test_paired({"q": 1.0}, {"q": 0.0})  # type: ignore[call-arg]


def test_bootstrap_ci_rejects_empty_or_nan_scores() -> None:
    with pytest.raises(DataError, match="no items"):
        bootstrap_ci([], seed=0)
    with pytest.raises(DataError, match="NaN"):
        bootstrap_ci([0.5, math.nan], seed=0)


def test_over_seeds_mean_and_sample_std_by_hand() -> None:
    summary = over_seeds([0.5, 0.6, 0.7])
    # mean 0.6; squared deviations 0.01 + 0 + 0.01 over n - 1 = 2: std = sqrt(0.01) = 0.1.
    assert summary.mean == pytest.approx(0.6)
    assert summary.std == pytest.approx(0.1)
    assert summary.n == 3
    assert over_seeds([0.55, 0.65]).std == pytest.approx(math.sqrt(2 * 0.05**2))
    single = over_seeds([0.42])
    assert (single.mean, single.std, single.n) == (0.42, None, 1)
