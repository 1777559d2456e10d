"""N runs against the first: `compare_runs` pairs each run with the reference run (harness.analysis.pairing)
and judges every pair across runs, with the between-run drift in the verdict (harness.analysis.drift).

Per run B against the reference A:
- calibration: B's log ratios less an offset: the runs' median matmul rates (default, when both
  recorded one), the median log ratio of reference cells (`reference`: a selection expression of
  cells declared unchanged), or none; never across devices;
- drift scale: from replicates when two or more of the given runs share a code version and a device
  (the log ratios between them are drift alone), else from the spread of this comparison's own cells;
- each pair: `judge_pair` (ratio, 95% interval, p, verdict, and the basis of both in words).
Two runs on different devices are compared without calibration or drift (within-run spread only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from harness.analysis.drift import (
    CALIBRATION_MATMUL,
    CALIBRATION_NONE,
    CELLS,
    REPLICATES,
    Calibration,
    DriftScale,
    drift_scale,
    matmul_calibration,
    reference_calibration,
)
from harness.analysis.pairing import (
    INCONCLUSIVE,
    KEY,
    NOISE_ALPHA,
    WITHIN_RUN,
    Judgement,
    Pairing,
    comparable_rows,
    judge_pair,
    pair_runs,
)
from harness.expressions import select_rows
from harness.store.reader import StoredRun


@dataclass(frozen=True)
class Versus:
    """One run (`run`) against the reference: its pairing, calibration, drift scale and judgements (by key)."""

    run: StoredRun
    pairing: Pairing
    calibration: Calibration
    drift: DriftScale
    judged: dict[str, Judgement] = field(default_factory=dict)

    @property
    def basis(self) -> str:
        """What this run's intervals and verdicts account for, in one sentence."""
        return f"{self.calibration.why}; {self.drift.text()}"

    def frame(self) -> pd.DataFrame:
        """`Pairing.frame()` with the judgement across runs: `ratio` calibrated, `ci_low` / `ci_high` its
        interval, `p_value` and `noise` / `within_noise` the verdict across runs; `raw_ratio` as measured."""
        frame = self.pairing.frame()
        if frame.empty:
            return frame
        judged = [self.judged[key] for key in frame[KEY]]
        frame["raw_ratio"] = frame["ratio"]
        frame["ratio"] = [j.ratio for j in judged]
        frame["ci_low"] = [j.interval[0] for j in judged]
        frame["ci_high"] = [j.interval[1] for j in judged]
        frame["p_value"] = [math.nan if j.p_value is None else j.p_value for j in judged]
        frame["noise"] = [j.noise for j in judged]
        frame["within_noise"] = [{"within noise": True, "beyond noise": False}.get(j.noise) for j in judged]
        frame["inconclusive"] = [j.noise == INCONCLUSIVE for j in judged]
        return frame


@dataclass(frozen=True)
class MultiComparison:
    """The reference run and every other run against it, in the order given."""

    reference: StoredRun
    others: tuple[Versus, ...]


def _log_ratios(pairing: Pairing, keys: set[str] | None = None) -> list[float]:
    """log(B / A) of the finished, uncontended pairs (of `keys` when given)."""
    return [
        math.log(p.ratio)
        for p in pairing.matched
        if p.finished and p.noise != INCONCLUSIVE and math.isfinite(p.ratio) and p.ratio > 0 and (keys is None or p.key in keys)
    ]


def calibrate(a: StoredRun, b: StoredRun, pairing: Pairing, method: str, reference: str | None) -> Calibration:
    """The calibration of B against A: `reference` cells when given, else `method` (matmul or none);
    none across devices. ExpressionError for a bad `reference`."""
    if a.device_name != b.device_name:
        return Calibration(why=f"no calibration (different devices: {a.device_name} vs {b.device_name})")
    if reference is not None:
        keys = set(select_rows(comparable_rows(a.rows), reference)[KEY])
        return reference_calibration(_log_ratios(pairing, keys), reference)
    if method == CALIBRATION_MATMUL:
        return matmul_calibration(a.rows, b.rows)
    return Calibration(why="no calibration (--calibration none)")


def replicate_deviations(runs: Sequence[StoredRun], method: str, reference: str | None) -> tuple[list[float], list[str]]:
    """(calibrated log ratios between consecutive runs of one code version and device, the run labels
    they came from): drift alone, where the code did not change."""
    deviations: list[float] = []
    labels: list[str] = []
    groups: dict[tuple[str, str], list[StoredRun]] = {}
    for run in runs:
        groups.setdefault((run.code_version, run.device_name), []).append(run)
    for group in groups.values():
        for first, second in zip(group, group[1:]):
            if first.path.resolve() == second.path.resolve():
                continue  # a run named twice is not a replicate of itself
            pairing = pair_runs(first.rows, second.rows)
            offset = calibrate(first, second, pairing, method, reference).offset
            deviations += [v - offset for v in _log_ratios(pairing)]
            labels += [first.label, second.label]
    return deviations, sorted(set(labels))


def compare_runs(
    runs: Sequence[StoredRun], calibration: str = CALIBRATION_MATMUL, reference: str | None = None, alpha: float = NOISE_ALPHA
) -> MultiComparison:
    """Every run after the first against the first (ratios run / first), judged with the drift."""
    if len(runs) < 2:
        raise ValueError("compare_runs needs at least two runs")
    first = runs[0]
    replicated, sources = replicate_deviations(runs, calibration, reference)
    shared = drift_scale(replicated, REPLICATES, f"runs {', '.join(sources)}" if sources else "no two runs share a code version")
    others = []
    for run in runs[1:]:
        pairing = pair_runs(first.rows, run.rows, alpha)
        if run.device_name != first.device_name:
            cal = Calibration(why=f"no calibration (different devices: {first.device_name} vs {run.device_name})")
            drift = DriftScale(None, CALIBRATION_NONE, 0, "different devices")
        else:
            cal = calibrate(first, run, pairing, calibration, reference)
            drift = shared if shared.scale is not None else drift_scale([v - cal.offset for v in _log_ratios(pairing)], CELLS)
        basis = f"{cal.why}; {drift.text()}" if drift.scale is not None else WITHIN_RUN
        judged = {p.key: judge_pair(p, cal.offset, drift.scale, basis, alpha) for p in pairing.pairs}
        others.append(Versus(run, pairing, cal, drift, judged))
    return MultiComparison(first, tuple(others))
