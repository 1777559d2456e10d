"""Regression check: a run against a stored baseline, cell by cell.

    python -m harness check RUN --baseline BASELINE [--any-device] [--format text|json|markdown] [--checks FILE]

The cells are paired by `harness.analysis.pairing.pair_runs` (the engine `harness compare` renders:
identity by `config_key_of`, a quality run per evaluation by `quality_key_of`), only between runs
measured on the same device name unless `any_device`. The rules come from `--checks FILE`, else
from the `checks:` block of the suite the run was made with (run.json keeps its text), else the
defaults of `harness.check.rules`:

- time: slower by >= threshold (10%) AND the pair's noise test (two-sided Mann-Whitney U on the
  per-repeat samples) gives p < p_value (0.01); faster by the same factor and significant is an
  improvement; too few repeats for the test to reach p_value is `untested`;
- memory: peak memory up by more than max(threshold x baseline, floor_mib);
- bpd: the first of `columns` (eval_bpd, bpd) present in both runs up by more than threshold;
- status: any change from `ok`, or between failure kinds, is a regression (always, no threshold);
- ratios (harness.check.ratios): a time ratio within one run against the same ratio in the baseline.

A cell whose timing stayed contended (in the run or the baseline) makes its time comparison, and
every wall-time ratio it is part of, `inconclusive`: reported with the reason, counted neither as a
pass nor as a fail. Its memory, bpd and status comparisons stand (other load does not move them),
and so do CPU-time ratios (meant for shared machines).

Exit status of the command: 1 when any comparison is a regression, 0 otherwise, 2 for unusable
input (CheckError, a ResultsError, which the CLI turns into 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from harness.analysis.pairing import Pair, Pairing, comparable_rows, finite, pair_runs
from harness.analysis.targets import suite_checks
from harness.check.baseline import resolve_baseline
from harness.check.ratios import compare_ratios
from harness.check.rules import ChecksError, ChecksSpec, load_checks_file
from harness.check.verdicts import (
    IMPROVEMENT,
    INCONCLUSIVE,
    MISSING,
    NEW,
    REGRESSION,
    SAME,
    UNTESTED,
    CheckError,
    Comparison,
    cell_labeller,
    contention_note,
    verdict_of,
)
from harness.store.files import ResultsError
from harness.store.reader import StoredRun, read_run
from harness.store.schema import KIND, KIND_QUALITY, MESSAGE, PEAK_MEM_MIB, STATUS, STATUS_OK, SUITE, THREADS, TIME_MS_MEDIAN


def load_run_data(arg: str | Path, root: str | Path = "results") -> StoredRun:
    """`results.read_run` of `arg`, with the rows a check reads (`comparable_rows`, keyed in KEY)."""
    run = read_run(arg, root)
    return replace(run, rows=comparable_rows(run.rows))


def rules_for(run: StoredRun, checks_file: str | Path | None = None) -> tuple[ChecksSpec, str]:
    """(rules, where they came from): `checks_file`, else the run's suite `checks:` block, else defaults."""
    try:
        if checks_file is not None:
            return load_checks_file(checks_file), str(checks_file)
        return suite_checks(run)
    except ChecksError as error:
        raise CheckError(str(error)) from None
    except CheckError:
        raise
    except ResultsError as error:  # the suite's block did not validate
        raise CheckError(str(error)) from None


def _time_comparison(pair: Pair, rules: ChecksSpec, label: str) -> Comparison:
    """The time comparison of a pair of finished cells (a = baseline, b = run)."""
    base, now = pair.a or {}, pair.b or {}
    values = (finite(base.get(TIME_MS_MEDIAN)), finite(now.get(TIME_MS_MEDIAN)))
    vague = contention_note(base, now)
    if vague:
        return Comparison(label, "time_ms", *values, pair.ratio, None, INCONCLUSIVE, vague, pair.key)
    if not pair.samples_a or not pair.samples_b:
        return Comparison(label, "time_ms", *values, pair.ratio, None, UNTESTED, "no samples to compare", pair.key)
    sizes = (len(pair.samples_b), len(pair.samples_a))
    verdict, note = verdict_of(pair.ratio, pair.noise, sizes, rules.time.threshold, rules.time.p_value)
    interval = pair.interval if all(math.isfinite(v) for v in pair.interval) else None
    return Comparison(label, "time_ms", *values, pair.ratio, pair.p_value, verdict, note, pair.key, interval)


def compare_cells(pair: Pair, rules: ChecksSpec, label: str) -> list[Comparison]:
    """The comparisons of one matched pair (a = baseline, b = run) under `rules`."""
    base, now, key = pair.a or {}, pair.b or {}, pair.key
    base_status, now_status = str(base.get(STATUS)), str(now.get(STATUS))
    if base_status != now_status:
        if not rules.status.enabled:
            return [Comparison(label, STATUS, base_status, now_status, verdict=UNTESTED, note="status rule disabled", config_key=key)]
        verdict = IMPROVEMENT if now_status == STATUS_OK else REGRESSION
        note = (str(now.get(MESSAGE) or "").splitlines() or [""])[0][:120] if now_status != STATUS_OK else ""
        return [Comparison(label, STATUS, base_status, now_status, verdict=verdict, note=note, config_key=key)]
    if now_status != STATUS_OK:
        return [Comparison(label, STATUS, base_status, now_status, verdict=SAME, note="failed in both", config_key=key)]

    out: list[Comparison] = []
    measured = now.get(KIND) != KIND_QUALITY  # a training cell's rows carry bpd, not timing samples or peak memory
    if rules.time.enabled and measured:
        out.append(_time_comparison(pair, rules, label))
    if rules.memory.enabled and measured:
        b, n = finite(base.get(PEAK_MEM_MIB)), finite(now.get(PEAK_MEM_MIB))
        if b is None or n is None:
            out.append(Comparison(label, PEAK_MEM_MIB, b, n, verdict=UNTESTED, note="no memory reading", config_key=key))
        else:
            allowed = max(rules.memory.threshold * abs(b), rules.memory.floor_mib)
            verdict = REGRESSION if n - b > allowed else IMPROVEMENT if b - n > allowed else SAME
            out.append(Comparison(label, PEAK_MEM_MIB, b, n, n / b if b > 0 else None, None, verdict, f"allowed +/-{allowed:.2f} MiB", key))
    if rules.bpd.enabled:
        for column in rules.bpd.columns:
            b, n = finite(base.get(column)), finite(now.get(column))
            if b is None or n is None:
                continue
            threshold = rules.bpd.threshold
            verdict = REGRESSION if n - b > threshold else IMPROVEMENT if b - n > threshold else SAME
            out.append(Comparison(label, column, b, n, n / b if b else None, None, verdict, f"allowed +/-{threshold:g}", key))
            break
    return out


def judge_pairs(pairing: Pairing, base: pd.DataFrame, now: pd.DataFrame, rules: ChecksSpec) -> list[Comparison]:
    """Every comparison of a check: each pair (a = baseline, b = run) in the pairing's order (a cell
    only in the baseline is `missing`, one only in the run `new`), then the ratio rules over both
    runs' comparable rows."""
    label: Callable[[dict], str] = cell_labeller([base, now])
    out: list[Comparison] = []
    for pair in pairing.pairs:
        old, new = pair.a or {}, pair.b or {}
        if pair.matched:
            out.extend(compare_cells(pair, rules, label(new)))
        elif pair.b is None:
            missing = Comparison(label(old), "cell", old.get(STATUS), None, verdict=MISSING, note="not in the run", config_key=pair.key)
            out.append(missing)
        else:
            added = Comparison(label(new), "cell", None, new.get(STATUS), verdict=NEW, note="not in the baseline", config_key=pair.key)
            out.append(added)
    for rule in rules.ratios:
        if rule.enabled:
            out.extend(compare_ratios(base, now, rule, label))
    return out


@dataclass
class CheckReport:
    """Everything a check found: both runs, the rules used, the pairing, every comparison, warnings."""

    run: StoredRun
    baseline: StoredRun
    rules: ChecksSpec
    rules_source: str
    pairing: Pairing
    comparisons: list[Comparison]
    warnings: list[str] = field(default_factory=list)

    def count(self, verdict: str) -> int:
        """How many comparisons have `verdict`."""
        return sum(c.verdict == verdict for c in self.comparisons)

    @property
    def matched_cells(self) -> int:
        """How many cells the run and the baseline share."""
        return len(self.pairing.matched)

    @property
    def exit_code(self) -> int:
        """1 when any comparison is a regression, else 0."""
        return 1 if self.count(REGRESSION) else 0

    def summary(self) -> str:
        """ "PASS: 0 regression(s), ... (N comparisons over M matched cells; run X vs baseline Y)"."""
        verdict = "FAIL" if self.exit_code else "PASS"
        parts = [f"{self.count(REGRESSION)} regression(s)", f"{self.count(IMPROVEMENT)} improvement(s)", f"{self.count(SAME)} unchanged"]
        if self.count(INCONCLUSIVE):
            parts.append(f"{self.count(INCONCLUSIVE)} inconclusive (contended cells: neither a pass nor a fail)")
        parts += [f"{self.count(v)} {v}" for v in (UNTESTED, MISSING, NEW) if self.count(v)]
        return (
            f"{verdict}: {', '.join(parts)} ({len(self.comparisons)} comparisons over {self.matched_cells} matched cells; "
            f"run {self.run.label} vs baseline {self.baseline.label})"
        )


def _warnings(run: StoredRun, base: StoredRun, rules: ChecksSpec) -> list[str]:
    out = []
    if run.device_name != base.device_name:
        out.append(
            f"devices differ (run: {run.device_name!r}, baseline: {base.device_name!r})"
            + ("; absolute times are compared across devices" if rules.time.enabled else "")
        )
    for column in (SUITE, THREADS):
        ours, theirs = (sorted({str(v) for v in d.rows.get(column, pd.Series(dtype=object)).dropna()}) for d in (run, base))
        if ours and theirs and ours != theirs:
            out.append(f"{column} differs (run: {', '.join(ours)}; baseline: {', '.join(theirs)})")
    torch_versions = [(d.info.get("environment") or {}).get("torch") for d in (run, base)]
    if all(torch_versions) and torch_versions[0] != torch_versions[1]:
        out.append(f"torch differs (run: {torch_versions[0]}, baseline: {torch_versions[1]})")
    return out


def run_check(
    run_arg: str | Path,
    baseline_arg: str | Path,
    root: str | Path = "results",
    any_device: bool = False,
    checks_file: str | Path | None = None,
) -> CheckReport:
    """Load both runs, refuse mismatched devices (unless `any_device`), pair them, judge the pairs."""
    run = load_run_data(run_arg, root)
    baseline_path = resolve_baseline(baseline_arg, run.device_name, root, any_device)
    try:
        base = load_run_data(baseline_path, root)
    except CheckError:
        raise
    except ResultsError as error:
        raise CheckError(f"baseline {baseline_path}: {error}") from None
    if run.device_name != base.device_name and not any_device:
        raise CheckError(
            f"device mismatch: run {run.label} was measured on {run.device_name!r} but baseline {base.label} on "
            f"{base.device_name!r}; results are only comparable on the same device. Pass --any-device to compare "
            "anyway (meant for device-independent checks: memory, time ratios, status)."
        )
    rules, source = rules_for(run, checks_file)
    pairing = pair_runs(base.rows, run.rows, alpha=rules.time.p_value)
    comparisons = judge_pairs(pairing, base.rows, run.rows, rules)
    report = CheckReport(run, base, rules, source, pairing, comparisons, _warnings(run, base, rules))
    if report.matched_cells == 0:
        raise CheckError(
            f"no cell of run {run.label} matches a cell of baseline {base.label} (different configurations: "
            "was the suite changed? promote a new baseline)"
        )
    return report
