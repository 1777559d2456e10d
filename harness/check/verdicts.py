"""The verdicts of a check, one comparison, and the rule that decides a verdict.

A regression needs both an effect and evidence: the change (now / baseline, larger is worse) must
reach the threshold (slower by >= threshold, or faster by the same factor for an improvement) AND
the per-repeat samples must differ beyond noise by the one noise test of the harness
(`harness.analysis.pairing.noise_test`: two-sided Mann-Whitney U, p < p_value). An effect whose
samples are too few for the test to reach p_value at all is `untested`; one the test does not back
is `same` ("slower but not significant").
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import pandas as pd

from harness.analysis.pairing import TOO_FEW, WITHIN, noise_test
from harness.analysis.stats import median
from harness.analysis.tables import row_contended
from harness.store.files import ResultsError
from harness.store.schema import (
    BATCH,
    CONFIG_COLUMNS,
    CONTENDED,
    CONTENTION,
    EVAL_VARIANT,
    MODEL_COLUMNS,
    SEQ_LEN,
    TRAIN_VARIANT,
    VARIANT,
    VARIANT_LABEL,
)

REGRESSION, IMPROVEMENT, SAME, UNTESTED, MISSING, NEW = "regression", "improvement", "same", "untested", "missing", "new"
INCONCLUSIVE = "inconclusive"  # a time comparison of a cell contended in the run or the baseline: neither pass nor fail
VERDICTS = (REGRESSION, IMPROVEMENT, SAME, INCONCLUSIVE, UNTESTED, MISSING, NEW)


class CheckError(ResultsError):
    """Unusable input for a check or a promotion (exit status 2); str is a human message."""


@dataclass
class Comparison:
    """One metric of one matched cell (or one ratio): baseline, now, now/baseline, p-value, verdict."""

    cell: str
    metric: str
    baseline: Any
    now: Any
    ratio: float | None = None
    p_value: float | None = None
    verdict: str = SAME
    note: str = ""
    config_key: str = ""
    interval: tuple[float, float] | None = None  # the 95% bootstrap interval of `ratio` (time comparisons with samples)

    def as_dict(self) -> dict[str, Any]:
        """The comparison as JSON-able values (NaN and infinities as None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def verdict_of(change: float, noise: str, sizes: tuple[int, int], threshold: float, alpha: float) -> tuple[str, str]:
    """(verdict, note) of an effect `change` (now / baseline, larger is worse) whose samples (of
    `sizes` now and baseline) got the noise verdict `noise` at level `alpha`."""
    slower = change >= 1
    beyond = change >= 1 + threshold if slower else change <= 1 / (1 + threshold)
    if not beyond:
        return SAME, ""
    if noise == TOO_FEW:
        return UNTESTED, f"{sizes[0]} vs {sizes[1]} repeats cannot reach p < {alpha:g}; raise min_repeats"
    if noise == WITHIN:
        return SAME, f"{'slower' if slower else 'faster'} but not significant"
    return (REGRESSION if slower else IMPROVEMENT), ""


def decide(change: float, now: Sequence[float], base: Sequence[float], threshold: float, alpha: float) -> tuple[float | None, str, str]:
    """(p-value, verdict, note) for an effect `change` (now / baseline, larger is worse) backed by
    per-repeat samples: the noise test, then `verdict_of`."""
    p, noise = noise_test(base, now, alpha)
    return (p, *verdict_of(change, noise, (len(now), len(base)), threshold, alpha))


def compare_samples(now: Sequence[float], base: Sequence[float], threshold: float, alpha: float) -> tuple[float, float | None, str, str]:
    """(median now / median base, p-value, verdict, note) for two sets of samples where larger is worse."""
    ratio = median(now) / median(base) if now and base and median(base) > 0 else math.nan
    if not math.isfinite(ratio):
        return ratio, None, UNTESTED, "no samples to compare"
    return (ratio, *decide(ratio, now, base, threshold, alpha))


def contention_note(*rows: dict, names: Sequence[str] = ("baseline", "run")) -> str:
    """ "contended, run: <reason>; baseline: <reason>" for the contended ones of `rows` (named by
    `names`), "" when none is: a time comparison of them is inconclusive."""
    parts = [f"{name}: {row.get(CONTENTION) or CONTENDED}" for name, row in zip(names, rows) if row_contended(row)]
    return ("contended, " + "; ".join(parts))[:300] if parts else ""


def cell_labeller(frames: Iterable[pd.DataFrame]) -> Callable[[dict], str]:
    """A function row -> short cell label: variant label plus the config columns that vary."""
    combined = pd.concat([f for f in frames if len(f)], ignore_index=True)
    candidates = [c for c in CONFIG_COLUMNS if c != VARIANT] + list(MODEL_COLUMNS)
    varying = []
    for column in candidates:
        if column in combined.columns and combined[column].map(lambda v: json.dumps(v, default=str)).nunique() > 1:
            varying.append(column)
    if SEQ_LEN not in varying:
        varying.insert(0, SEQ_LEN)
    short = {SEQ_LEN: "L", BATCH: "B"}

    def label(row: dict) -> str:
        parts = [str(row.get(VARIANT_LABEL) or row.get(VARIANT))]
        evaluated = row.get(EVAL_VARIANT)
        if isinstance(evaluated, str) and evaluated and evaluated != row.get(TRAIN_VARIANT):
            parts[0] += f" (eval {evaluated})"
        for column in varying:
            value = row.get(column)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            parts.append(f"{short.get(column, column)}={value}")
        return " ".join(parts)

    return label
