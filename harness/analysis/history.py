"""A suite's metric across its runs on one device, ordered by code version, with its step changes.

`build_histories(entries, metric)` -> one `History` per device: every configuration (the pairing
engine's identity, `comparable_rows`) of every run as a point; the code versions in commit order when
git knows all of them, else by their first run's start; and the **step changes**: for each pair of
consecutive code versions and each configuration, the change of its value (median over the version's
runs; times calibrated by each run's matmul rate where every run recorded one) judged like `harness
compare` judges a pair (harness.analysis.pairing.judge_log_ratio: between-run drift from runs of one
code version where there are several, else from all consecutive changes; the within-run test on the
pooled samples), and kept when it is beyond noise (p < alpha) *and* beyond `threshold` (relative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from harness.analysis.catalog import RunEntry
from harness.analysis.drift import CELLS, REPLICATES, DriftScale, drift_scale, matmul_rate
from harness.analysis.pairing import (
    KEY,
    NOISE_ALPHA,
    WITHIN,
    bootstrap_interval,
    comparable_rows,
    judge_log_ratio,
    noise_test,
    samples_of,
)
from harness.analysis.series import primary_axis, with_series
from harness.analysis.stats import median
from harness.analysis.tables import is_contended
from harness.expressions import select_rows
from harness.store.schema import (
    ACCURACY,
    COLUMNS,
    EVAL_BPD,
    PEAK_MEM_MIB,
    RUN_ID,
    STATUS,
    STATUS_OK,
    TIME_MS_MEDIAN,
    TIME_MS_SAMPLES,
    TIME_NOISY,
)
from harness.store.versions import commit_range

STEP_THRESHOLD = 0.10  # a step must change the value by at least 10% (the check's default time threshold)


@dataclass(frozen=True)
class Metric:
    """What a history follows: `column` of each point, its per-repeat `samples` column (None: one value
    per cell), whether a higher value is worse, its unit, and whether times are calibrated."""

    name: str
    column: str
    samples: str | None = None
    higher_is_worse: bool = True
    unit: str = ""
    calibrated: bool = False


METRICS = {
    "time": Metric("time", TIME_MS_MEDIAN, TIME_MS_SAMPLES, True, "ms", True),
    "memory": Metric("memory", PEAK_MEM_MIB, None, True, "MiB"),
    "bpd": Metric("bpd", EVAL_BPD, None, True, "bits/dim"),  # not a column: the metric's name
    "accuracy": Metric("accuracy", ACCURACY, None, False, "%"),  # not a column: the metric's name
}


def metric_of(name: str) -> Metric:
    """METRICS[name], or any numeric row column by its name (higher is worse); ValueError otherwise."""
    if name in METRICS:
        return METRICS[name]
    if name in COLUMNS:
        return Metric(name, name)
    raise ValueError(f"unknown metric {name!r}: one of {', '.join(METRICS)} or a result column")


@dataclass(frozen=True)
class Step:
    """A step change of one configuration between two consecutive code versions."""

    key: str
    label: str
    before: str
    after: str
    commits: str
    ratio: float
    interval: tuple[float, float]
    p_value: float | None
    worse: bool


@dataclass
class History:
    """One suite's metric on one device: `versions` in order, with their run ids; `points` one row per
    (run, configuration): KEY, `label`, run_id, `version`, `position` (the run's place on the x axis),
    `value` (as stored), `calibrated`, `hollow` (contended or noisy: drawn hollow),
    `inconclusive` (contended: no step from it), `samples`; the steps; the drift."""

    suite: str
    device: str
    metric: Metric
    versions: list[tuple[str, list[str]]]
    points: pd.DataFrame
    runs: list[RunEntry]
    steps: list[Step] = field(default_factory=list)
    drift: DriftScale = DriftScale(None, "none")
    calibration: str = "no calibration"
    threshold: float = STEP_THRESHOLD
    alpha: float = NOISE_ALPHA

    @property
    def latest_worse(self) -> list[Step]:
        """The steps for the worse into the latest code version (what `--fail-on-step` fails on)."""
        last = self.versions[-1][0] if self.versions else None
        return [s for s in self.steps if s.after == last and s.worse]


def order_versions(entries: Sequence[RunEntry]) -> list[tuple[str, list[RunEntry]]]:
    """Code versions with their runs (by start): in commit order when git knows every version, else by
    their first run's start."""
    groups: dict[str, list[RunEntry]] = {}
    for entry in sorted(entries, key=lambda e: (e.started, e.run.run_id)):
        groups.setdefault(entry.run.code_version, []).append(entry)
    by_commit = all(runs[0].commit_time is not None for runs in groups.values())
    return sorted(
        groups.items(), key=lambda item: (item[1][0].commit_time or 0, item[1][0].started) if by_commit else (item[1][0].started,)
    )


def _points(ordered: list[tuple[str, list[RunEntry]]], metric: Metric, selection: str | None) -> tuple[pd.DataFrame, str]:
    runs = [entry for _, group in ordered for entry in group]
    rates = [matmul_rate(entry.run.rows) for entry in runs]
    calibrate = metric.calibrated and all(rate is not None for rate in rates)
    reference = median([r for r in rates if r is not None]) if calibrate else math.nan
    frames = []
    for position, (entry, rate) in enumerate(zip(runs, rates)):
        rows = comparable_rows(entry.run.rows)
        if selection:
            rows = select_rows(rows, selection)
        if metric.column not in rows or rows.empty:
            continue
        rows = rows[rows[STATUS].eq(STATUS_OK)] if STATUS in rows else rows
        factor = rate / reference if calibrate and rate else 1.0  # a run on a machine 5% faster at matmul: times x 1.05
        values = pd.to_numeric(rows[metric.column], errors="coerce")
        noisy = rows[TIME_NOISY].eq(True) if TIME_NOISY in rows and metric.samples else False
        frames.append(
            rows.assign(
                **{RUN_ID: entry.run.run_id},
                version=entry.run.code_version,
                position=position,
                value=values,
                calibrated=values * factor,
                hollow=is_contended(rows) | noisy,
                inconclusive=is_contended(rows),
                samples=[[v * factor for v in samples_of(r, metric.samples)] if metric.samples else [] for r in rows.to_dict("records")],
            )
        )
    if not frames:
        return pd.DataFrame(), ""
    points = pd.concat(frames, ignore_index=True)
    points = points[points["value"].notna()]
    x = primary_axis(points)
    points = with_series(points, x)
    points["label"] = points["series"] + f" {x}=" + points[x].astype(str)
    why = f"times normalised by each run's median matmul rate (to {reference:.4g} GFLOP/s)" if calibrate else "no calibration"
    return points.reset_index(drop=True), why


def _by_version(points: pd.DataFrame, version: str) -> dict[str, tuple[float, list[float], bool]]:
    """key -> (median calibrated value over the version's runs, pooled samples, every point contended)."""
    out = {}
    for key, part in points[points["version"] == version].groupby(KEY, sort=False):
        samples = [v for s in part["samples"] for v in s]
        out[key] = (median(part["calibrated"].tolist()), samples, bool(part["inconclusive"].all()))
    return out


def _replicates(points: pd.DataFrame, ordered: list[tuple[str, list[RunEntry]]]) -> list[float]:
    deviations = []
    for _, group in ordered:
        for first, second in zip(group, group[1:]):
            a = points[points[RUN_ID] == first.run.run_id].set_index(KEY)["calibrated"]
            b = points[points[RUN_ID] == second.run.run_id].set_index(KEY)["calibrated"]
            both = a.index.intersection(b.index)
            deviations += [math.log(b[k] / a[k]) for k in both if a[k] > 0 and b[k] > 0]
    return deviations


def _steps(points: pd.DataFrame, versions: list[str], metric: Metric, drift: DriftScale, threshold: float, alpha: float) -> list[Step]:
    steps = []
    labels = dict(zip(points[KEY], points["label"]))
    for before, after in zip(versions, versions[1:]):
        old, new = _by_version(points, before), _by_version(points, after)
        for key in [k for k in old if k in new]:
            (a, samples_a, contended_a), (b, samples_b, contended_b) = old[key], new[key]
            if contended_a or contended_b or not (a > 0 and b > 0):
                continue  # contended both ways, or no value: no verdict
            ratio = b / a
            interval, log_sd = bootstrap_interval(samples_a, samples_b, ratio) if samples_a and samples_b else ((math.nan,) * 2, 0.0)
            within_p, within = noise_test(samples_a, samples_b, alpha) if samples_a and samples_b else (None, "")
            if drift.scale is not None:
                p, interval = judge_log_ratio(math.log(ratio), log_sd, drift.scale, alpha)
            else:
                p = within_p
            if p is None or p >= alpha or within == WITHIN or abs(ratio - 1) < threshold and abs(1 / ratio - 1) < threshold:
                continue
            worse = ratio > 1 if metric.higher_is_worse else ratio < 1
            steps.append(Step(key, labels[key], before, after, commit_range(before, after), ratio, interval, p, worse))  # type: ignore[arg-type]
    return steps


def build_histories(
    entries: Sequence[RunEntry], metric: Metric, selection: str | None = None, threshold: float = STEP_THRESHOLD, alpha: float = NOISE_ALPHA
) -> list[History]:
    """One History per device of the runs `entries` (one suite; baselines left out), the devices with
    the most runs first. `selection`: the --filter expression (ExpressionError when invalid)."""
    by_device: dict[str, list[RunEntry]] = {}
    for entry in entries:
        if not entry.baseline:
            by_device.setdefault(entry.run.device_name, []).append(entry)
    histories = []
    for device, runs in sorted(by_device.items(), key=lambda item: (-len(item[1]), item[0])):
        ordered = order_versions(runs)
        points, calibration = _points(ordered, metric, selection)
        versions = [(version, [e.run.run_id for e in group]) for version, group in ordered]
        history = History(runs[0].suite, device, metric, versions, points, [e for _, g in ordered for e in g], calibration=calibration)
        history.threshold, history.alpha = threshold, alpha
        if not points.empty:
            replicated = _replicates(points, ordered)
            drift = drift_scale(replicated, REPLICATES)
            if drift.scale is None:
                changes = []
                names = [v for v, _ in versions]
                for before, after in zip(names, names[1:]):
                    old, new = _by_version(points, before), _by_version(points, after)
                    changes += [math.log(new[k][0] / old[k][0]) for k in old if k in new and old[k][0] > 0 and new[k][0] > 0]
                drift = drift_scale(changes, CELLS)
            history.drift = drift
            history.steps = _steps(points, [v for v, _ in versions], metric, drift, threshold, alpha)
        histories.append(history)
    return histories
