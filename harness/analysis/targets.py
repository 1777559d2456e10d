"""Absolute targets within one run (`checks: targets:` of a suite): what `harness check RUN --targets`
prints and the report's "Targets" section shows.

Each `TargetRule` (harness.check.rules, the schema of the `checks:` block) gives one row per numerator cell: its metric, divided by
the matching denominator cell's when the rule names one (of several ok denominator cells, the
fastest), against the bound. A target is met when all its rows are; unfinished numerator cells
and numerators without an ok denominator are misses (a target that cannot be measured is not met).
A row of a timed metric (time, floor_ratio, time_per_token) whose numerator or denominator cell
stayed contended is `inconclusive`: reported with the reason, neither met nor missed.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from harness.analysis.pairing import comparable_rows
from harness.analysis.tables import row_contended
from harness.check.rules import ChecksError, ChecksSpec, TargetRule, checks_from_suite_text
from harness.expressions import ExpressionError, both, select_rows
from harness.store.files import ResultsError
from harness.store.reader import StoredRun
from harness.store.schema import (
    ACTIVATION_MEM_MIB,
    BACKWARD_MS_MEDIAN,
    BATCH,
    BPD,
    CONTENTION,
    DEVICE,
    EVAL_BPD,
    FLOOR_RATIO,
    FORWARD_MS_MEDIAN,
    PEAK_MEM_MIB,
    SEQ_LEN,
    STATUS,
    STATUS_OK,
    TIME_MS_MEDIAN,
    VARIANT_LABEL,
)

TIMED_METRICS = ("time", "forward_time", "backward_time", FLOOR_RATIO, "time_per_token")  # the metrics other load on the machine moves


def suite_checks(run: StoredRun) -> tuple[ChecksSpec, str]:
    """(the `checks:` block of the suite `run` was made with, where it came from): run.json keeps the
    suite's text; its `cpu:`/`cuda:` block applies for the device of the rows. The defaults when the
    suite has none. ResultsError for a block that does not validate."""
    text = run.info.get("suite_text")
    if not text:
        return ChecksSpec(), "defaults"
    devices = run.rows.get(DEVICE, pd.Series(dtype=object)).dropna()
    device = str(devices.iloc[0]) if len(devices) else str((run.info.get("environment") or {}).get(DEVICE, "cpu"))
    where = f"{run.info.get('suite_path', 'the suite')} (as recorded in {run.label}/run.json)"
    try:
        spec = checks_from_suite_text(text, device, where)
    except ChecksError as error:
        raise ResultsError(str(error)) from None
    return (spec, where) if spec is not None else (ChecksSpec(), "defaults (the suite has no checks: block)")


def run_targets(run: StoredRun) -> tuple[pd.DataFrame, str] | None:
    """The suite's targets evaluated on `run` (its `comparable_rows`) and where they came from; None
    when the suite sets none. ResultsError when they cannot be evaluated."""
    rules, source = suite_checks(run)
    if not rules.targets:
        return None
    return evaluate_targets(comparable_rows(run.rows), rules.targets), source


def metric_value(row: dict[str, Any], metric: str) -> float:
    """The rule metric of one result row: time (s), peak_mem (MiB), activation_mem (MiB; rows from
    before the breakdown: their peak_mem), floor_ratio, time_per_token (s), bpd (a quality run's
    final `eval_bpd`, bits per symbol)."""

    def number(key: str) -> float:
        value = row.get(key)
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return math.nan

    if metric == "time":
        return number(TIME_MS_MEDIAN) / 1e3
    if metric == "forward_time":
        return number(FORWARD_MS_MEDIAN) / 1e3
    if metric == "backward_time":
        return number(BACKWARD_MS_MEDIAN) / 1e3
    if metric == "peak_mem":
        return number(PEAK_MEM_MIB)
    if metric == "activation_mem":
        value = number(ACTIVATION_MEM_MIB)
        return value if math.isfinite(value) else number(PEAK_MEM_MIB)
    if metric == FLOOR_RATIO:
        return number(FLOOR_RATIO)
    if metric == BPD:
        return number(EVAL_BPD)
    if metric == "time_per_token":
        return number(TIME_MS_MEDIAN) / 1e3 / (number(SEQ_LEN) * number(BATCH))
    raise ValueError(f"unknown target metric {metric!r}")


def _select(frame: pd.DataFrame, expr: str, at: str | None, rule: TargetRule) -> pd.DataFrame:
    try:
        return select_rows(frame, both(expr, at))
    except ExpressionError as error:
        raise ResultsError(f"target {rule.name or rule.numerator!r}: {error}") from None


def evaluate_targets(frame: pd.DataFrame, rules: list[TargetRule]) -> pd.DataFrame:
    """One row per (target, numerator cell): target, cell, value, denominator, bound, met, note."""
    rows = []
    for rule in rules:
        name = rule.name or (rule.numerator if rule.denominator is None else f"{rule.numerator} / {rule.denominator}")
        missing = [c for c in rule.match_on if c not in frame.columns]
        if rule.denominator is not None and missing:
            raise ResultsError(f"target {name!r}: match_on column(s) {missing} not in the results")
        numerators = _select(frame, rule.numerator, rule.at, rule)
        # the denominator may sit at another length (e.g. time per token at 64K over 4K): `at` filters numerators only
        denominators = _select(frame, rule.denominator, None, rule) if rule.denominator is not None else None
        if numerators.empty:
            rows.append(
                {
                    "target": name,
                    "cell": "",
                    "value": math.nan,
                    "denominator": "",
                    "met": False,
                    "inconclusive": False,
                    "note": "no numerator cell in this run",
                    "bound": _bound(rule),
                }
            )
        for num in numerators.to_dict("records"):
            cell = f"{num.get(VARIANT_LABEL)} L={num.get(SEQ_LEN)}" + (f" B={num[BATCH]}" if BATCH in num else "")
            value, den_label, note = metric_value(num, rule.metric), "", ""
            used = [num]  # the cells the value comes from
            if num.get(STATUS) != STATUS_OK:
                value, note = math.nan, f"numerator {num.get(STATUS)}"
            elif denominators is not None:
                same = denominators[denominators[STATUS] == STATUS_OK]
                for column in rule.match_on:
                    same = same[same[column] == num[column]]
                if same.empty:
                    value, note = math.nan, "no ok denominator cell"
                else:
                    timed = TIME_MS_MEDIAN in same and same[TIME_MS_MEDIAN].notna().any()
                    den = (same.loc[same[TIME_MS_MEDIAN].idxmin()] if timed else same.iloc[0]).to_dict()
                    den_label = f"{den.get(VARIANT_LABEL)} L={den.get(SEQ_LEN)}"
                    value = value / metric_value(den, rule.metric)
                    used.append(den)
            met = math.isfinite(value) and (rule.max is None or value <= rule.max) and (rule.min is None or value >= rule.min)
            vague = rule.metric in TIMED_METRICS and math.isfinite(value) and any(row_contended(r) for r in used)
            if vague:
                met = False
                note = "inconclusive, contended: " + "; ".join(str(r.get(CONTENTION) or "") for r in used if row_contended(r))
            rows.append(
                {
                    "target": name,
                    "cell": cell,
                    "value": value,
                    "denominator": den_label,
                    "bound": _bound(rule),
                    "met": met,
                    "inconclusive": vague,
                    "note": note[:300],
                }
            )
    return pd.DataFrame(rows, columns=["target", "cell", "value", "denominator", "bound", "met", "inconclusive", "note"])


def targets_pass(table: pd.DataFrame) -> bool:
    """Every row met or inconclusive (a contended cell is neither a pass nor a fail)."""
    return bool((table["met"] | table["inconclusive"]).all())


def _bound(rule: TargetRule) -> str:
    parts = [f"<= {rule.max:g}" if rule.max is not None else "", f">= {rule.min:g}" if rule.min is not None else ""]
    return " and ".join(p for p in parts if p) or "(none)"
