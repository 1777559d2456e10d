"""Absolute targets within one run (`checks: targets:` of a suite): `harness check RUN --targets`.

Each `TargetRule` (harness.check_rules) gives one row per numerator cell: its metric, divided by
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

from harness.check_rules import TargetRule
from harness.expressions import ExpressionError, both, select_rows
from harness.store.files import ResultsError
from harness.tables import row_contended

TIMED_METRICS = ("time", "floor_ratio", "time_per_token")  # the metrics other load on the machine moves


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
        return number("time_ms_median") / 1e3
    if metric == "peak_mem":
        return number("peak_mem_mib")
    if metric == "activation_mem":
        value = number("activation_mem_mib")
        return value if math.isfinite(value) else number("peak_mem_mib")
    if metric == "floor_ratio":
        return number("floor_ratio")
    if metric == "bpd":
        return number("eval_bpd")
    if metric == "time_per_token":
        return number("time_ms_median") / 1e3 / (number("seq_len") * number("batch"))
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
            cell = f"{num.get('variant_label')} L={num.get('seq_len')}" + (f" B={num['batch']}" if "batch" in num else "")
            value, den_label, note = metric_value(num, rule.metric), "", ""
            used = [num]  # the cells the value comes from
            if num.get("status") != "ok":
                value, note = math.nan, f"numerator {num.get('status')}"
            elif denominators is not None:
                same = denominators[denominators["status"] == "ok"]
                for column in rule.match_on:
                    same = same[same[column] == num[column]]
                if same.empty:
                    value, note = math.nan, "no ok denominator cell"
                else:
                    timed = "time_ms_median" in same and same["time_ms_median"].notna().any()
                    den = (same.loc[same["time_ms_median"].idxmin()] if timed else same.iloc[0]).to_dict()
                    den_label = f"{den.get('variant_label')} L={den.get('seq_len')}"
                    value = value / metric_value(den, rule.metric)
                    used.append(den)
            met = math.isfinite(value) and (rule.max is None or value <= rule.max) and (rule.min is None or value >= rule.min)
            vague = rule.metric in TIMED_METRICS and math.isfinite(value) and any(row_contended(r) for r in used)
            if vague:
                met = False
                note = "inconclusive, contended: " + "; ".join(str(r.get("contention") or "") for r in used if row_contended(r))
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


def format_targets(table: pd.DataFrame, source: str) -> str:
    """Plain-text table of evaluate_targets' rows and a one-line verdict."""
    if table.empty:
        return f"no targets in {source}"
    met = [("INCONCLUSIVE" if vague else "MET" if ok else "MISSED") for ok, vague in zip(table["met"], table["inconclusive"])]
    shown = table.drop(columns="inconclusive").assign(value=table["value"].map(lambda v: f"{v:.3f}" if math.isfinite(v) else "-"), met=met)
    vague = int(table["inconclusive"].sum())
    missed = int((~table["met"] & ~table["inconclusive"]).sum())
    verdict = f"{int(table['met'].sum())} of {len(table)} met" + (f"; {missed} missed" if missed else "")
    verdict += f"; {vague} inconclusive (contended cells: neither met nor missed)" if vague else ""
    return f"targets from {source}:\n{shown.to_string(index=False)}\n{verdict}"
