"""Between-run drift: how much two runs of the same code differ, so that a verdict across runs does not
take it for a change (docs/decisions.md, "Between-run drift").

A cell's log time ratio between two runs is modelled as

    log(t_B / t_A) = calibration offset + drift + within-run error (+ a real change)

- the calibration offset: what a measurement taken inside each run says about the machine's speed
  then: the median matmul rate the cells record (`matmul_gflops`, suites with `measure.matmul_rate`),
  or the median log ratio of reference cells the user declares unchanged (`--reference EXPR`);
- the drift: a Student t with 3 degrees of freedom (heavy tails: between the two committed `peers`
  runs of the same kernels a quarter of the cells lie beyond 2.6 robust standard deviations, where a
  normal law puts 1%), its scale estimated robustly (median absolute deviation / 0.765) from
  deviations that are drift alone: the log ratios between runs of one code version ("replicates")
  where such runs exist, else the log ratios of all cells of the comparison (most cells unchanged);
- the within-run error: the spread of a seeded bootstrap over the stored samples, added in quadrature.

Nothing here reads run folders; harness.analysis.comparison and harness.analysis.history feed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from harness.analysis.stats import T3_MEDIAN_ABS, median
from harness.store.schema import MATMUL_GFLOPS, STATUS, STATUS_OK

MIN_DEVIATIONS = 8  # fewer deviations than this give no drift scale (the MAD of a handful is a guess)
CALIBRATION_MATMUL, CALIBRATION_REFERENCE, CALIBRATION_NONE = "matmul", "reference", "none"
CALIBRATIONS = (CALIBRATION_MATMUL, CALIBRATION_NONE)  # what --calibration offers; --reference picks the third
REPLICATES, CELLS, NO_DRIFT = "replicates", "cells", "none"  # where a drift scale came from


@dataclass(frozen=True)
class DriftScale:
    """The scale of the drift's t distribution on log ratios (None: not estimated), where it came
    from (REPLICATES, CELLS or NO_DRIFT), from how many deviations, and why in words."""

    scale: float | None
    basis: str
    n: int = 0
    why: str = ""

    def text(self) -> str:
        """One phrase for captions: the scale as a percentage and its basis."""
        if self.scale is None:
            return f"no between-run drift estimate ({self.why or 'too few deviations'}): within-run spread only"
        what = "runs of the same code version" if self.basis == REPLICATES else "all cells compared (most assumed unchanged)"
        return f"between-run drift scale {math.expm1(self.scale):.1%} (t, 3 df; from {self.n} log ratios between {what})"


def drift_scale(deviations: Sequence[float], basis: str, why: str = "") -> DriftScale:
    """The drift scale of log-ratio `deviations`: MAD about their median / T3_MEDIAN_ABS (the MAD of a
    unit t with 3 df); None when fewer than MIN_DEVIATIONS finite ones."""
    values = [v for v in deviations if math.isfinite(v)]
    if len(values) < MIN_DEVIATIONS:
        return DriftScale(None, NO_DRIFT, len(values), why or f"{len(values)} deviations, at least {MIN_DEVIATIONS} needed")
    centre = median(values)
    mad = median([abs(v - centre) for v in values])
    return DriftScale(max(mad / T3_MEDIAN_ABS, 1e-6), basis, len(values), why)


def matmul_rate(rows: pd.DataFrame) -> float | None:
    """A run's calibration: the median `matmul_gflops` over its finished rows (GFLOP/s); None without one."""
    if MATMUL_GFLOPS not in rows or STATUS not in rows:
        return None
    values = pd.to_numeric(rows.loc[rows[STATUS] == STATUS_OK, MATMUL_GFLOPS], errors="coerce").dropna()
    values = values[values > 0]
    return float(values.median()) if len(values) else None


@dataclass(frozen=True)
class Calibration:
    """How run B's log ratios to run A are corrected: `offset` is subtracted from each log(B / A)
    (0 when none); `method` one of CALIBRATION_MATMUL, CALIBRATION_REFERENCE, CALIBRATION_NONE; `why`
    the numbers in words."""

    offset: float = 0.0
    method: str = CALIBRATION_NONE
    why: str = "no calibration"


def matmul_calibration(rows_a: pd.DataFrame, rows_b: pd.DataFrame) -> Calibration:
    """B's times scaled by its matmul rate over A's (a machine 5% faster at matmul is expected 5%
    faster at everything); no calibration when a run lacks the rate."""
    rate_a, rate_b = matmul_rate(rows_a), matmul_rate(rows_b)
    if rate_a is None or rate_b is None:
        return Calibration(why="no calibration (a run has no matmul rate: suites with measure.matmul_rate record it)")
    offset = math.log(rate_a / rate_b)
    return Calibration(offset, CALIBRATION_MATMUL, f"normalised by each run's median matmul rate ({rate_a:.4g} vs {rate_b:.4g} GFLOP/s)")


def reference_calibration(log_ratios: Sequence[float], expression: str) -> Calibration:
    """The median log ratio of the reference cells (those `expression` selects, declared unchanged)."""
    values = [v for v in log_ratios if math.isfinite(v)]
    if not values:
        return Calibration(why=f"no calibration (no finished reference cell matches {expression!r})")
    offset = median(values)
    return Calibration(
        offset, CALIBRATION_REFERENCE, f"normalised by {len(values)} reference cell(s) `{expression}` ({math.exp(offset):.3f}x)"
    )
