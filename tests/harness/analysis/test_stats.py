"""harness.analysis.stats against scipy (a test-only dependency)."""

import math
import random

import pytest

from harness.analysis.stats import mann_whitney_u, median, min_p_value, rank_with_ties, u_distribution_counts

scipy_stats = pytest.importorskip("scipy.stats")


def _samples(rng: random.Random, n: int, shift: float, decimals: int) -> list[float]:
    return [round(rng.gauss(10 + shift, 1), decimals) for _ in range(n)]


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_matches_scipy_on_random_samples(alternative):
    rng = random.Random(1234)
    for _ in range(150):
        n1, n2 = rng.randint(1, 25), rng.randint(1, 25)
        decimals = rng.choice([0, 1, 4])  # 0 decimals: many ties
        x, y = _samples(rng, n1, rng.choice([0, 0.5, 2]), decimals), _samples(rng, n2, 0, decimals)
        methods = ["auto", "asymptotic"] + (["exact"] if len(set(x + y)) == n1 + n2 else [])
        for method in methods:
            ours = mann_whitney_u(x, y, alternative, method)
            theirs = scipy_stats.mannwhitneyu(x, y, alternative=alternative, method=method)
            assert ours.statistic == pytest.approx(theirs.statistic, abs=1e-9)
            assert ours.pvalue == pytest.approx(theirs.pvalue, rel=1e-9, abs=1e-12), (x, y, method)


def test_matches_scipy_without_continuity_correction():
    rng = random.Random(7)
    x, y = _samples(rng, 30, 0.3, 2), _samples(rng, 40, 0, 2)
    ours = mann_whitney_u(x, y, "greater", "asymptotic", continuity=False)
    theirs = scipy_stats.mannwhitneyu(x, y, use_continuity=False, alternative="greater", method="asymptotic")
    assert ours.pvalue == pytest.approx(theirs.pvalue, rel=1e-9)


def test_all_values_tied_gives_no_evidence():
    assert mann_whitney_u([1.0] * 10, [1.0] * 10).pvalue == pytest.approx(
        scipy_stats.mannwhitneyu([1.0] * 10, [1.0] * 10, alternative="greater").pvalue
    )


def test_exact_distribution_counts_orderings():
    for n1, n2 in [(1, 1), (3, 5), (8, 8), (4, 20)]:
        counts = u_distribution_counts(n1, n2)
        assert len(counts) == n1 * n2 + 1 and sum(counts) == math.comb(n1 + n2, n1)
        assert counts == counts[::-1] and min(counts) >= 1


def test_min_p_value_and_helpers():
    assert min_p_value(3, 3) == pytest.approx(0.05)
    assert min_p_value(5, 5) < 0.01
    assert median([3, 1, 2]) == 2 and median([4, 1, 3, 2]) == 2.5 and math.isnan(median([]))
    assert rank_with_ties([10, 20, 10, 30]) == ([1.5, 3.0, 1.5, 4.0], [2, 1, 1])


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        mann_whitney_u([], [1.0])
    with pytest.raises(ValueError):
        mann_whitney_u([float("nan")], [1.0])
    with pytest.raises(ValueError):
        mann_whitney_u([1.0], [2.0], alternative="bigger")  # type: ignore[arg-type]
