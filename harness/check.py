"""Regression check: compare a run with a stored baseline, cell by cell; promote runs to baselines.

    python -m harness check RUN --baseline BASELINE [--any-device] [--format text|json|markdown] [--checks FILE]
    python -m harness baseline RUN --name NAME

Cells are matched by `harness.cells.benchmark.config_key_of` (the configuration without the code version),
only between runs measured on the same device name unless `any_device`. The rules come from
`--checks FILE`, else from the `checks:` block of the suite the run was made with (run.json keeps
its text), else the defaults of `harness.check_rules`:

- time: slower by >= threshold (10%) AND a one-sided Mann-Whitney U test on the per-repeat
  samples gives p < p_value (0.01); faster by the same factor and significant is an improvement;
- memory: peak memory up by more than max(threshold x baseline, floor_mib);
- bpd: the first of `columns` (eval_bpd, bpd) present in both runs up by more than threshold;
- status: any change from `ok`, or between failure kinds, is a regression (always, no threshold);
- ratios: median(numerator) / median(denominator) time within one run, against the same ratio in
  the baseline: up by >= threshold and significant on the per-repeat ratios.

A cell whose timing stayed contended (`contended`, in the run or the baseline) makes its time
comparison, and every wall-time ratio it is part of, `inconclusive`: reported with the reason,
counted neither as a pass nor as a fail. Its memory, bpd and status comparisons stand (other load
does not move them), and so do CPU-time ratios (meant for shared machines).

Exit status of the command: 1 when any comparison is a regression, 0 otherwise, 2 for unusable
input (raised here as CheckError, a ResultsError, which the CLI turns into 2).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from harness.check_rules import RATIO_SAMPLES, ChecksError, ChecksSpec, RatioRule, checks_from_suite_text, load_checks_file
from harness.environment import device_slug
from harness.expressions import ExpressionError, both, select_rows
from harness.safe_io import InputFileError, parse_json
from harness.stats import mann_whitney_u, median, min_p_value
from harness.store.files import ResultsError, file_mode, to_json
from harness.store.reader import StoredRun, cell_rows, read_run
from harness.store.schema import CONFIG_COLUMNS, model_defaults
from harness.store.schema import config_key as config_key_of
from harness.tables import row_contended

BASELINES_DIR = "baselines"
BASELINE_INFO = "baseline.json"
REGRESSION, IMPROVEMENT, SAME, UNTESTED, MISSING, NEW = "regression", "improvement", "same", "untested", "missing", "new"
INCONCLUSIVE = "inconclusive"  # a time comparison of a cell contended in the run or the baseline: neither pass nor fail
VERDICTS = (REGRESSION, IMPROVEMENT, SAME, INCONCLUSIVE, UNTESTED, MISSING, NEW)


class CheckError(ResultsError):
    """Unusable input for a check or a promotion (exit status 2); str is a human message."""


# --------------------------------------------------------------------------- loading


# train_config entries that say how a training ran, not what it computes: not part of a quality row's identity.
TRAIN_CONFIG_RUN_ONLY = ("threads", "checkpoint_every", "timeout_s")


def quality_key_of(row: dict) -> str:
    """Identity of one evaluation of a training cell (a quality run's `eval` row, or the `train` row of
    a cell that failed before evaluating, which stands for its own-attention evaluation): the
    model/variant identity of `config_key_of` plus the task, the training settings (less
    TRAIN_CONFIG_RUN_ONLY) and the eval variant. First 16 hex of a sha256."""

    def text(name: str, fallback: str) -> Any:
        value = row.get(name)
        return value if isinstance(value, str) and value else row.get(fallback)

    def parsed(name: str, fallback: str = "") -> dict:
        value = text(name, fallback)
        try:
            data = parse_json(value, f"column {name}") if isinstance(value, str) and value else {}
        except InputFileError as error:
            raise CheckError(f"a row of cell {row.get('cell_key')!r}: {error}") from None
        return data if isinstance(data, dict) else {}

    identity = {
        "config": config_key_of(row),
        "task": parsed("task_params"),
        "train": {k: v for k, v in parsed("train_config").items() if k not in TRAIN_CONFIG_RUN_ONLY},
        "eval_variant": text("eval_variant_name", "variant"),
        "eval_params": parsed("eval_variant_params", "variant_params"),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checked_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows a check compares, each with a `config_key`. A benchmark run: one row per cell (a cell
    measured in rounds: its combined row, not its rounds), keyed by `config_key_of`. A quality run:
    its `eval` rows (final eval bpd and accuracy per training cell and eval variant) plus the `train`
    row of each training cell that stored no eval row (it failed: its status is what is compared),
    keyed by `quality_key_of`; its learning-curve rows are not compared."""
    rows = cell_rows(frame).copy()
    if "row_type" in rows and rows["row_type"].isin(["eval", "train", "curve"]).any():
        evals = rows[rows["row_type"] == "eval"]
        trains = rows[rows["row_type"] == "train"]
        failed = trains[~trains["cell_key"].isin(evals.get("train_key", pd.Series(dtype=object)))]
        rows = pd.concat([evals, failed], ignore_index=True)
        rows["config_key"] = [quality_key_of(row) for row in rows.to_dict("records")]
    else:
        rows["config_key"] = [config_key_of(row) for row in rows.to_dict("records")]
    return rows


def for_check(run: StoredRun) -> StoredRun:
    """`run` with the rows a check reads: those of `checked_rows`, with a `config_key` recomputed from
    the config columns (so runs stored before the column existed match too); when a configuration
    occurs twice (a run resumed with another code version) the row written last wins."""
    rows = checked_rows(run.rows)
    return replace(run, rows=rows.drop_duplicates("config_key", keep="last").reset_index(drop=True))


def load_run_data(arg: str | Path, root: str | Path = "results") -> StoredRun:
    """`results.read_run` of `arg`, then `for_check`."""
    return for_check(read_run(arg, root))


def resolve_baseline(arg: str | Path, device_name: str, root: str | Path = "results", any_device: bool = False) -> Path:
    """The baseline folder for `arg`: an existing path as given, else a baseline name looked up as
    `<root>/baselines/<device slug>/<arg>` (with `any_device`, the only `<root>/baselines/*/<arg>`)."""
    path = Path(arg)
    if path.exists():
        return path
    root = Path(root)
    if len(path.parts) != 1:
        raise CheckError(f"baseline {str(arg)!r} not found: no such file or folder")
    mine = root / BASELINES_DIR / device_slug(device_name) / str(arg)
    if mine.is_dir():
        return mine
    looked = [str(mine)]
    if any_device:
        others = sorted(p for p in (root / BASELINES_DIR).glob(f"*/{arg}") if p.is_dir())
        if len(others) == 1:
            return others[0]
        if len(others) > 1:
            raise CheckError(
                f"baseline {str(arg)!r} exists for several devices: {', '.join(map(str, others))}; "
                "pass the folder of the one to compare with"
            )
        looked.append(str(root / BASELINES_DIR / "*" / str(arg)))
    raise CheckError(
        f"no baseline named {str(arg)!r} for device {device_name!r}: looked for {' and '.join(looked)}. "
        f"Create it from a run with: python -m harness baseline RUN --name {arg}"
    )


def rules_for(run: StoredRun, checks_file: str | Path | None = None) -> tuple[ChecksSpec, str]:
    """(rules, where they came from): `checks_file`, else the run's suite `checks:` block, else defaults."""
    try:
        if checks_file is not None:
            return load_checks_file(checks_file), str(checks_file)
        text = run.info.get("suite_text")
        if text:
            devices = run.rows.get("device", pd.Series(dtype=object)).dropna()
            device = str(devices.iloc[0]) if len(devices) else str((run.info.get("environment") or {}).get("device", "cpu"))
            where = f"{run.info.get('suite_path', 'suite')} (as recorded in {run.label}/run.json)"
            spec = checks_from_suite_text(text, device, where)
            if spec is not None:
                return spec, where
            return ChecksSpec(), "defaults (the suite has no checks: block)"
    except ChecksError as error:
        raise CheckError(str(error)) from None
    return ChecksSpec(), "defaults"


# --------------------------------------------------------------------------- comparing


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

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def samples_of(row: dict, column: str = "time_ms_samples") -> list[float]:
    """The per-repeat times (ms) of a row in `column`; [] when it has none."""
    value = row.get(column)
    if isinstance(value, str):
        try:
            value = parse_json(value, column)
        except InputFileError:
            return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return []
    return [float(v) for v in value if _finite(v) is not None]


def compare_samples(now: Sequence[float], base: Sequence[float], threshold: float, alpha: float) -> tuple[float, float | None, str, str]:
    """(median now / median base, p-value, verdict, note) for two sets of samples where larger is worse.

    A regression needs both the effect (ratio >= 1 + threshold) and significance (one-sided
    Mann-Whitney U, p < alpha); an improvement the mirror image (ratio <= 1 / (1 + threshold)).
    """
    ratio = median(now) / median(base) if now and base and median(base) > 0 else math.nan
    if not math.isfinite(ratio):
        return ratio, None, UNTESTED, "no samples to compare"
    return (ratio, *decide(ratio, now, base, threshold, alpha))


def decide(change: float, now: Sequence[float], base: Sequence[float], threshold: float, alpha: float) -> tuple[float, str, str]:
    """(p-value, verdict, note) for an effect `change` (now / baseline, larger is worse) backed by samples."""
    slower = change >= 1
    p = mann_whitney_u(now, base, "greater" if slower else "less").pvalue
    beyond = change >= 1 + threshold if slower else change <= 1 / (1 + threshold)
    if not beyond:
        return p, SAME, ""
    if min_p_value(len(now), len(base)) >= alpha:
        return p, UNTESTED, f"{len(now)} vs {len(base)} repeats cannot reach p < {alpha:g}; raise min_repeats"
    if p >= alpha:
        return p, SAME, f"{'slower' if slower else 'faster'} but not significant"
    return p, REGRESSION if slower else IMPROVEMENT, ""


def _labeller(frames: Iterable[pd.DataFrame]) -> Any:
    """A function row -> short cell label: variant label plus the config columns that vary."""
    combined = pd.concat([f for f in frames if len(f)], ignore_index=True)
    candidates = [c for c in CONFIG_COLUMNS if c != "variant"] + [name for name, _ in model_defaults()]
    varying = []
    for column in candidates:
        if column in combined.columns and combined[column].map(lambda v: json.dumps(v, default=str)).nunique() > 1:
            varying.append(column)
    if "seq_len" not in varying:
        varying.insert(0, "seq_len")
    short = {"seq_len": "L", "batch": "B"}

    def label(row: dict) -> str:
        parts = [str(row.get("variant_label") or row.get("variant"))]
        evaluated = row.get("eval_variant")
        if isinstance(evaluated, str) and evaluated and evaluated != row.get("train_variant"):
            parts[0] += f" (eval {evaluated})"
        for column in varying:
            value = row.get(column)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            parts.append(f"{short.get(column, column)}={value}")
        return " ".join(parts)

    return label


def contention_note(*rows: dict, names: Sequence[str] = ("baseline", "run")) -> str:
    """ "contended: run: <reason>; baseline: <reason>" for the contended ones of `rows` (named by
    `names`), "" when none is: a time comparison of them is inconclusive."""
    parts = [f"{name}: {row.get('contention') or 'contended'}" for name, row in zip(names, rows) if row_contended(row)]
    return ("contended, " + "; ".join(parts))[:300] if parts else ""


def compare_cells(base: dict, now: dict, rules: ChecksSpec, label: str) -> list[Comparison]:
    """The comparisons of one matched cell under `rules`."""
    key = str(now.get("config_key", ""))
    base_status, now_status = str(base.get("status")), str(now.get("status"))
    if base_status != now_status:
        if not rules.status.enabled:
            return [Comparison(label, "status", base_status, now_status, verdict=UNTESTED, note="status rule disabled", config_key=key)]
        verdict = IMPROVEMENT if now_status == "ok" else REGRESSION
        note = (str(now.get("message") or "").splitlines() or [""])[0][:120] if now_status != "ok" else ""
        return [Comparison(label, "status", base_status, now_status, verdict=verdict, note=note, config_key=key)]
    if now_status != "ok":
        return [Comparison(label, "status", base_status, now_status, verdict=SAME, note="failed in both", config_key=key)]

    out: list[Comparison] = []
    measured = now.get("kind") != "quality"  # a training cell's rows carry bpd, not timing samples or peak memory
    if rules.time.enabled and measured:
        now_samples, base_samples = samples_of(now), samples_of(base)
        ratio, p, verdict, note = compare_samples(now_samples, base_samples, rules.time.threshold, rules.time.p_value)
        if contention_note(base, now):
            p, verdict, note = None, INCONCLUSIVE, contention_note(base, now)
        out.append(
            Comparison(
                label, "time_ms", _finite(base.get("time_ms_median")), _finite(now.get("time_ms_median")), ratio, p, verdict, note, key
            )
        )
    if rules.memory.enabled and measured:
        b, n = _finite(base.get("peak_mem_mib")), _finite(now.get("peak_mem_mib"))
        if b is None or n is None:
            out.append(Comparison(label, "peak_mem_mib", b, n, verdict=UNTESTED, note="no memory reading", config_key=key))
        else:
            allowed = max(rules.memory.threshold * abs(b), rules.memory.floor_mib)
            verdict = REGRESSION if n - b > allowed else IMPROVEMENT if b - n > allowed else SAME
            out.append(
                Comparison(label, "peak_mem_mib", b, n, n / b if b > 0 else None, None, verdict, f"allowed +/-{allowed:.2f} MiB", key)
            )
    if rules.bpd.enabled:
        for column in rules.bpd.columns:
            b, n = _finite(base.get(column)), _finite(now.get(column))
            if b is None or n is None:
                continue
            threshold = rules.bpd.threshold
            verdict = REGRESSION if n - b > threshold else IMPROVEMENT if b - n > threshold else SAME
            out.append(Comparison(label, column, b, n, n / b if b else None, None, verdict, f"allowed +/-{threshold:g}", key))
            break
    return out


def _ratio_pairs(frame: pd.DataFrame, rule: RatioRule, label: Any) -> dict[tuple[str, str], tuple[dict, dict]]:
    """(numerator key, denominator key) -> (numerator row, denominator row) of one run."""

    def select(expr: str) -> pd.DataFrame:
        try:
            return select_rows(frame, both(expr, rule.at))
        except ExpressionError as error:
            raise CheckError(f"ratio check: {error}") from None

    numerators, denominators = select(rule.numerator), select(rule.denominator)
    missing = [c for c in rule.match_on if c not in frame.columns]
    if missing:
        raise CheckError(f"ratio check {rule.numerator!r} / {rule.denominator!r}: match_on column(s) {missing} not in the results")
    pairs = {}
    for num in numerators.to_dict("records"):
        same = denominators
        for column in rule.match_on:
            same = same[same[column] == num[column]]
        if len(same) > 1:
            raise CheckError(
                f"ratio check: {len(same)} denominator cells ({rule.denominator!r}) match {label(num)!r} "
                f"on {rule.match_on}; narrow the denominator or add columns to match_on"
            )
        if len(same) == 1:
            den = same.iloc[0].to_dict()
            pairs[(num["config_key"], den["config_key"])] = (num, den)
    return pairs


def compare_ratios(base: pd.DataFrame, now: pd.DataFrame, rule: RatioRule, label: Any) -> list[Comparison]:
    """One comparison per (numerator, denominator) pair present in the baseline and/or the run.

    The per-repeat ratios numerator[i] / denominator[i] (samples paired in recorded order) of the
    run are tested against the baseline's with the one-sided Mann-Whitney U test.
    """
    base_pairs, now_pairs = _ratio_pairs(base, rule, label), _ratio_pairs(now, rule, label)
    if not base_pairs and not now_pairs:  # a check that compares nothing must not pass silently
        raise CheckError(
            f"ratio check {rule.name or rule.numerator + ' / ' + rule.denominator!r}: no numerator cell "
            f"({both(rule.numerator, rule.at)!r}) with a matching denominator cell ({rule.denominator!r}) in the run or the "
            "baseline; fix the expressions (`harness run SUITE --dry-run --filter EXPR` lists what one selects)"
        )
    out = []
    metric = f"{rule.metric.replace('_', ' ')} ratio"  # "time ratio" | "cpu time ratio"
    for key in list(base_pairs) + [k for k in now_pairs if k not in base_pairs]:
        pair = now_pairs.get(key) or base_pairs[key]
        name = rule.name or f"{label(pair[0])} / {label(pair[1])}"
        if key not in now_pairs or key not in base_pairs:
            out.append(Comparison(name, metric, None, None, verdict=MISSING if key not in now_pairs else NEW, config_key="/".join(key)))
            continue
        (bn, bd), (nn, nd) = base_pairs[key], now_pairs[key]
        if any(r.get("status") != "ok" for r in (bn, bd, nn, nd)):
            out.append(Comparison(name, metric, None, None, verdict=UNTESTED, note="a cell did not finish ok", config_key="/".join(key)))
            continue
        column = RATIO_SAMPLES[rule.metric]
        vague = contention_note(bn, bd, nn, nd, names=("baseline numerator", "baseline denominator", "numerator", "denominator"))
        if vague and rule.metric == "time":  # CPU-time ratios are meant for shared machines: they stand
            out.append(Comparison(name, metric, None, None, verdict=INCONCLUSIVE, note=vague, config_key="/".join(key)))
            continue
        nn_s, nd_s, bn_s, bd_s = (samples_of(r, column) for r in (nn, nd, bn, bd))
        if not (nn_s and nd_s and bn_s and bd_s) or min(median(nn_s), median(nd_s), median(bn_s), median(bd_s)) <= 0:
            out.append(Comparison(name, metric, None, None, verdict=UNTESTED, note=f"no {column} in both runs", config_key="/".join(key)))
            continue
        # Per-repeat ratios, samples paired in recorded order: independent draws of the ratio.
        per_now = [a / b for a, b in zip(nn_s, nd_s) if b > 0]
        per_base = [a / b for a, b in zip(bn_s, bd_s) if b > 0]
        ratio_now, ratio_base = median(nn_s) / median(nd_s), median(bn_s) / median(bd_s)
        change = ratio_now / ratio_base  # the effect: ratio of medians; the per-repeat ratios test it
        p, verdict, note = decide(change, per_now, per_base, rule.threshold, rule.p_value)
        out.append(Comparison(name, metric, ratio_base, ratio_now, change, p, verdict, note, "/".join(key)))
    return out


def compare(base: pd.DataFrame, now: pd.DataFrame, rules: ChecksSpec) -> list[Comparison]:
    """Every comparison between two runs' rows (both with a `config_key` column)."""
    label = _labeller([base, now])
    base_rows = {r["config_key"]: r for r in base.to_dict("records")}
    now_rows = {r["config_key"]: r for r in now.to_dict("records")}
    out: list[Comparison] = []
    for key, b in base_rows.items():
        if key in now_rows:
            out.extend(compare_cells(b, now_rows[key], rules, label(now_rows[key])))
        else:
            out.append(Comparison(label(b), "cell", b.get("status"), None, verdict=MISSING, note="not in the run", config_key=key))
    for key, n in now_rows.items():
        if key not in base_rows:
            out.append(Comparison(label(n), "cell", None, n.get("status"), verdict=NEW, note="not in the baseline", config_key=key))
    for rule in rules.ratios:
        if rule.enabled:
            out.extend(compare_ratios(base, now, rule, label))
    return out


# --------------------------------------------------------------------------- the check


@dataclass
class CheckReport:
    """Everything a check found: both runs, the rules used, every comparison, warnings."""

    run: StoredRun
    baseline: StoredRun
    rules: ChecksSpec
    rules_source: str
    comparisons: list[Comparison]
    warnings: list[str] = field(default_factory=list)

    def count(self, verdict: str) -> int:
        return sum(c.verdict == verdict for c in self.comparisons)

    @property
    def matched_cells(self) -> int:
        return len(set(self.run.rows["config_key"]) & set(self.baseline.rows["config_key"]))

    @property
    def exit_code(self) -> int:
        return 1 if self.count(REGRESSION) else 0

    def summary(self) -> str:
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
    for column in ("suite", "threads"):
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
    """Load both runs, refuse mismatched devices (unless `any_device`), compare under the rules."""
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
    comparisons = compare(base.rows, run.rows, rules)
    report = CheckReport(run, base, rules, source, comparisons, _warnings(run, base, rules))
    if report.matched_cells == 0:
        raise CheckError(
            f"no cell of run {run.label} matches a cell of baseline {base.label} (different configurations: "
            "was the suite changed? promote a new baseline)"
        )
    return report


# --------------------------------------------------------------------------- output


def _fmt(value: Any, metric: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        if metric == "time_ms":
            return f"{value:.3f} ms"
        if metric == "peak_mem_mib":
            return f"{value:.1f} MiB"
        return f"{value:.4g}"
    return str(value)


def _rows(report: CheckReport) -> list[list[str]]:
    rows = []
    for c in report.comparisons:
        p = "-" if c.p_value is None else (f"{c.p_value:.2g}" if c.p_value >= 1e-4 else "<1e-4")
        ratio = "-" if c.ratio is None or not math.isfinite(c.ratio) else f"{c.ratio:.3f}x"
        verdict = c.verdict.upper() if c.verdict == REGRESSION else c.verdict
        rows.append([c.cell, c.metric, _fmt(c.baseline, c.metric), _fmt(c.now, c.metric), ratio, p, verdict, c.note])
    return rows


HEADER = ["cell", "metric", "baseline", "now", "now/base", "p", "verdict", "note"]


def _rules_line(rules: ChecksSpec) -> str:
    parts = []
    if rules.time.enabled:
        parts.append(f"time >= +{rules.time.threshold:.0%} and p < {rules.time.p_value:g}")
    if rules.memory.enabled:
        parts.append(f"memory > +max({rules.memory.threshold:.0%}, {rules.memory.floor_mib:g} MiB)")
    if rules.bpd.enabled:
        parts.append(f"bpd ({'/'.join(rules.bpd.columns)}) > +{rules.bpd.threshold:g}")
    if rules.status.enabled:
        parts.append("any status change")
    for r in rules.ratios:
        if r.enabled:
            parts.append(f"{r.metric} ratio {r.name or f'[{r.numerator}] / [{r.denominator}]'} >= +{r.threshold:.0%} and p < {r.p_value:g}")
    return "; ".join(parts) or "none"


def format_text(report: CheckReport) -> str:
    """A plain aligned table plus header and summary lines."""
    lines = [
        f"run:      {report.run.label}  [{report.run.device_name}; code {report.run.code_version}]",
        f"baseline: {report.baseline.path}  [{report.baseline.device_name}; code {report.baseline.code_version}]",
        f"rules:    {_rules_line(report.rules)}  (from {report.rules_source})",
    ]
    lines += [f"warning:  {w}" for w in report.warnings]
    table = [HEADER] + _rows(report)
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER) - 1)]
    lines.append("")
    for row in table:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    lines += ["", report.summary()]
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(report: CheckReport) -> str:
    """A markdown section for a CI comment or job summary."""

    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        f"### harness check: {report.summary()}",
        "",
        f"- run: `{report.run.label}` ({report.run.device_name}, code `{report.run.code_version}`)",
        f"- baseline: `{report.baseline.path}` ({report.baseline.device_name}, code `{report.baseline.code_version}`)",
        f"- rules: {escape(_rules_line(report.rules))} (from {escape(report.rules_source)})",
    ]
    lines += [f"- **warning**: {escape(w)}" for w in report.warnings]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in _rows(report):
        cells = [escape(c) for c in row]
        if row[6] == REGRESSION.upper():
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_json(report: CheckReport) -> str:
    """Machine-readable: summary counts, both runs, the rules, every comparison."""
    data = {
        "status": "fail" if report.exit_code else "pass",
        "exit_code": report.exit_code,
        "summary": report.summary(),
        "counts": {v: report.count(v) for v in VERDICTS},
        "run": {"path": str(report.run.path), "device_name": report.run.device_name, "code_version": report.run.code_version},
        "baseline": {
            "path": str(report.baseline.path),
            "device_name": report.baseline.device_name,
            "code_version": report.baseline.code_version,
        },
        "rules": report.rules.model_dump(),
        "rules_source": report.rules_source,
        "warnings": report.warnings,
        "comparisons": [c.as_dict() for c in report.comparisons],
    }
    return to_json(data)


FORMATS = {"text": format_text, "markdown": format_markdown, "json": format_json}


# --------------------------------------------------------------------------- baselines


def promote_baseline(run_arg: str | Path, name: str, root: str | Path = "results", force: bool = False) -> Path:
    """Copy a run folder to `<root>/baselines/<device slug>/<name>/` (atomically, via a temp folder),
    adding baseline.json (name, source, time). An unfinished run or an existing baseline needs `force`."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise CheckError(f"baseline name {name!r}: use only letters, digits, '_', '.', '-'")
    run = load_run_data(run_arg, root)
    source = run.path
    if not force and run.info and "finished_at" not in run.info:
        raise CheckError(f"run {source} did not finish (run.json has no finished_at); pass --force to promote it anyway")
    for item in source.rglob("*"):  # a baseline travels on in a repository: only plain files and folders
        if item.is_symlink() or not (item.is_file() or item.is_dir()):
            kind = "a symlink" if item.is_symlink() else "not a regular file or folder"
            raise CheckError(f"{item}: {kind}; a run folder promoted to a baseline holds plain files only")
    from harness.training import CheckpointError, load_checkpoint

    for checkpoint in sorted(source.rglob("*.pt")):  # a gadget must not travel on in a baseline either
        try:
            load_checkpoint(checkpoint)
        except CheckpointError as error:
            raise CheckError(f"{error}; not promoted (remove the file to promote the run without it)") from None
    dest = Path(root) / BASELINES_DIR / device_slug(run.device_name) / name
    if dest.exists() and not force:
        raise CheckError(f"baseline {dest} already exists; pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    staging.chmod(file_mode(folder=True))  # mkdtemp's 0700 would make the baseline private
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*.tmp", ".lock", ".*.lock"))
        info = {
            "name": name,
            "promoted_from": str(source),
            "run_id": source.name,
            "device_name": run.device_name,
            "code_version": run.code_version,
            "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / BASELINE_INFO).write_text(to_json(info) + "\n", encoding="utf-8")
        if dest.exists():
            old = dest.with_name(f".{name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
