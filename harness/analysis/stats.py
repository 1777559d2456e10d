"""Small statistics for comparing timings, without scipy (a test-only dependency).

`mann_whitney_u` is the Mann-Whitney U test (Wilcoxon rank-sum) with the same conventions as
`scipy.stats.mannwhitneyu`: the statistic is U of the first sample, ties get mid-ranks, and the
p-value is exact for small tie-free samples (either size <= 8) and otherwise from the normal
approximation with tie correction and a continuity correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

Alternative = Literal["greater", "less", "two-sided"]
Method = Literal["auto", "exact", "asymptotic"]
EXACT_MAX_SIZE = 8  # scipy's "auto": exact when either sample has at most 8 values and none tie
NOISE_ALPHA = 0.01  # significance level of the noise test (harness.analysis.pairing): compare, and check's default p_value


@dataclass(frozen=True)
class MannWhitneyResult:
    """U of the first sample and the p-value of the chosen alternative."""

    statistic: float
    pvalue: float
    method: str


def rank_with_ties(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """1-based mid-ranks of `values` (in their order) and the sizes of the groups of tied values."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    ties: list[int] = []
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        mid = (start + end) / 2 + 1  # ranks start+1 .. end+1, averaged
        for position in range(start, end + 1):
            ranks[order[position]] = mid
        ties.append(end - start + 1)
        start = end + 1
    return ranks, ties


def u_distribution_counts(n1: int, n2: int) -> list[int]:
    """How many of the C(n1+n2, n1) orderings give U = 0, 1, ..., n1*n2 (no ties).

    These are the coefficients of the Gaussian binomial [n1+n2 choose n1]_q
    = prod_{i=1..n1} (1 - q^(n2+i)) / (1 - q^i), computed with exact integers.
    """
    n1, n2 = min(n1, n2), max(n1, n2)  # the distribution is symmetric in the sizes; loop over the smaller
    degree = n1 * n2
    coefficients = [1] + [0] * degree
    for i in range(1, n1 + 1):
        shift = n2 + i
        for k in range(degree, shift - 1, -1):  # times (1 - q^shift)
            coefficients[k] -= coefficients[k - shift]
        for k in range(i, degree + 1):  # divided by (1 - q^i), i.e. times sum_j q^(i*j)
            coefficients[k] += coefficients[k - i]
    return coefficients


def _exact_sf(u: float, n1: int, n2: int) -> float:
    """P(U >= u) under the null hypothesis, for samples without ties."""
    counts = u_distribution_counts(n1, n2)
    start = max(0, math.ceil(u - 1e-9))
    return sum(counts[start:]) / math.comb(n1 + n2, n1)


def _normal_sf(u: float, n1: int, n2: int, ties: list[int], continuity: bool) -> float:
    """P(U >= u) from the tie-corrected normal approximation."""
    n = n1 + n2
    tie_term = sum(t**3 - t for t in ties)
    variance = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))
    numerator = u - n1 * n2 / 2 - (0.5 if continuity else 0.0)
    if variance <= 0:  # every value tied: no evidence either way
        return 1.0 if numerator <= 0 else 0.0
    z = numerator / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))


def mann_whitney_u(
    x: Sequence[float],
    y: Sequence[float],
    alternative: Alternative = "greater",
    method: Method = "auto",
    continuity: bool = True,
) -> MannWhitneyResult:
    """Mann-Whitney U test of x against y.

    alternative "greater": x tends to be larger than y (e.g. x = new times, y = baseline times,
    a slowdown); "less": smaller; "two-sided". Matches scipy.stats.mannwhitneyu(x, y,
    use_continuity=continuity, alternative=alternative, method=method).
    """
    x = [float(v) for v in x]
    y = [float(v) for v in y]
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("mann_whitney_u needs at least one value in each sample")
    if any(math.isnan(v) for v in x + y):
        raise ValueError("mann_whitney_u got NaN values")
    ranks, ties = rank_with_ties(x + y)
    u1 = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    u2 = n1 * n2 - u1
    if alternative == "greater":
        u, factor = u1, 1.0
    elif alternative == "less":
        u, factor = u2, 1.0
    elif alternative == "two-sided":
        u, factor = max(u1, u2), 2.0
    else:
        raise ValueError(f"alternative must be greater, less or two-sided, got {alternative!r}")
    if method == "auto":
        method = "exact" if min(n1, n2) <= EXACT_MAX_SIZE and max(ties) == 1 else "asymptotic"
    if method == "exact":
        p = _exact_sf(u, n1, n2)
    elif method == "asymptotic":
        p = _normal_sf(u, n1, n2, ties, continuity)
    else:
        raise ValueError(f"method must be auto, exact or asymptotic, got {method!r}")
    return MannWhitneyResult(statistic=u1, pvalue=min(max(p * factor, 0.0), 1.0), method=method)


def min_p_value(n1: int, n2: int) -> float:
    """The smallest one-sided p-value two samples of these sizes can reach (exact test, no ties):
    1 / C(n1+n2, n1). With 3 and 3 repeats it is 0.05, so p < 0.01 is out of reach."""
    return 1.0 / math.comb(n1 + n2, n1) if n1 and n2 else 1.0


def median(values: Sequence[float]) -> float:
    """Median (mean of the two middle values for an even count); NaN for no values."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# --------------------------------------------------------------------------- intervals and heavy tails

BOOTSTRAP_RESAMPLES = 2000  # resamples per interval: the 2.5% / 97.5% quantiles move by < 1% of the width beyond this
BOOTSTRAP_SEED = 0  # the default seed: the same samples always give the same interval


def bootstrap_log_ratios(a: Sequence[float], b: Sequence[float], seed: int = BOOTSTRAP_SEED, n: int = BOOTSTRAP_RESAMPLES) -> list[float]:
    """`n` bootstrap replicates of log(median(b) / median(a)): each side resampled with replacement
    on its own (numpy's PCG64 seeded with `seed`). [] when a side has no positive finite value."""
    import numpy as np

    xa = np.asarray([v for v in a if math.isfinite(v) and v > 0], dtype=float)
    xb = np.asarray([v for v in b if math.isfinite(v) and v > 0], dtype=float)
    if not len(xa) or not len(xb):
        return []
    rng = np.random.default_rng(seed)
    ma = np.median(xa[rng.integers(0, len(xa), size=(n, len(xa)))], axis=1)
    mb = np.median(xb[rng.integers(0, len(xb), size=(n, len(xb)))], axis=1)
    return np.log(mb / ma).tolist()


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, linear between order statistics (numpy's default); NaN for none."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def student_t3_sf(t: float) -> float:
    """P(T > t) for Student's t with 3 degrees of freedom (closed form)."""
    x = t / math.sqrt(3)
    return 0.5 - (x / (1 + x * x) + math.atan(x)) / math.pi


def student_t3_quantile(p: float) -> float:
    """The p-quantile (0 < p < 1) of Student's t with 3 degrees of freedom (bisection on `student_t3_sf`)."""
    low, high = -1e6, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        if 1 - student_t3_sf(mid) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


T3_MEDIAN_ABS = student_t3_quantile(0.75)  # median of |T| for t with 3 df (0.765): MAD / this is the scale
