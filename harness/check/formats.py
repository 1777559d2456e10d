"""A check's result as text (the terminal), Markdown (a CI comment or job summary) and JSON.

Each is a document of harness.report.document: the terminal text ends in the summary line, the
Markdown starts with it; the JSON carries the machine-readable result (status, counts, both runs,
the rules, every comparison) and the blocks of the Markdown document.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from harness.check.regression import CheckReport
from harness.check.rules import ChecksSpec
from harness.check.verdicts import REGRESSION, VERDICTS
from harness.report.document import Document, Heading, Items, Paragraph, Table, to_json, to_markdown, to_text
from harness.report.folders import shown_path
from harness.store.schema import CODE_VERSION, DEVICE_NAME, PEAK_MEM_MIB, STATUS

HEADER = ["cell", "metric", "baseline", "now", "now/base [95% interval]", "p", "verdict", "note"]


def _fmt(value: Any, metric: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        if metric == "time_ms":
            return f"{value:.3f} ms"
        if metric == PEAK_MEM_MIB:
            return f"{value:.1f} MiB"
        return f"{value:.4g}"
    return str(value)


def comparisons_table(report: CheckReport, text: str = "pandas") -> Table:
    """Every comparison as a row of HEADER (regressions in capitals and stressed)."""
    rows = []
    for c in report.comparisons:
        p = "-" if c.p_value is None else (f"{c.p_value:.2g}" if c.p_value >= 1e-4 else "<1e-4")
        ratio = "-" if c.ratio is None or not math.isfinite(c.ratio) else f"{c.ratio:.3f}x"
        ratio += f" [{c.interval[0]:.3f}-{c.interval[1]:.3f}]" if c.interval is not None and ratio != "-" else ""
        verdict = c.verdict.upper() if c.verdict == REGRESSION else c.verdict
        rows.append([c.cell, c.metric, _fmt(c.baseline, c.metric), _fmt(c.now, c.metric), ratio, p, verdict, c.note])
    frame = pd.DataFrame(rows, columns=HEADER)
    return Table(frame, index=False, emphasis=tuple(c.verdict == REGRESSION for c in report.comparisons), text=text)  # type: ignore[arg-type]


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


def text_document(report: CheckReport) -> Document:
    """The terminal form: the two runs and the rules, warnings, the table, the summary last."""
    run, base = report.run, report.baseline
    lines = [
        f"run:      {run.label}  [{run.device_name}; code {run.code_version}]",
        f"baseline: {shown_path(base.path)}  [{base.device_name}; code {base.code_version}]",
        f"rules:    {_rules_line(report.rules)}  (from {report.rules_source})",
        *(f"warning:  {w}" for w in report.warnings),
    ]
    return Document("harness check", [*map(Paragraph, lines), comparisons_table(report, "columns"), Paragraph(report.summary())])


def check_document(report: CheckReport) -> Document:
    """The Markdown / JSON form: the summary as a heading, the two runs, rules and warnings as a list,
    the table; `data`: the machine-readable result."""
    run, base = report.run, report.baseline
    items = [
        f"run: `{run.label}` ({run.device_name}, code `{run.code_version}`)",
        f"baseline: `{shown_path(base.path)}` ({base.device_name}, code `{base.code_version}`)",
        f"rules: {_rules_line(report.rules)} (from {report.rules_source})",
        *(f"**warning**: {w}" for w in report.warnings),
    ]
    data = {
        STATUS: "fail" if report.exit_code else "pass",
        "exit_code": report.exit_code,
        "summary": report.summary(),
        "counts": {v: report.count(v) for v in VERDICTS},
        "run": {"path": shown_path(run.path), DEVICE_NAME: run.device_name, CODE_VERSION: run.code_version},
        "baseline": {"path": shown_path(base.path), DEVICE_NAME: base.device_name, CODE_VERSION: base.code_version},
        "rules": report.rules.model_dump(),
        "rules_source": report.rules_source,
        "warnings": report.warnings,
        "comparisons": [c.as_dict() for c in report.comparisons],
    }
    blocks = [Heading(level=3, text=f"harness check: {report.summary()}"), Items(tuple(items)), comparisons_table(report)]
    return Document("harness check", blocks, data)


def format_text(report: CheckReport) -> str:
    """A plain aligned table plus header and summary lines."""
    return to_text(text_document(report))


def format_markdown(report: CheckReport) -> str:
    """A Markdown section for a CI comment or job summary."""
    return to_markdown(check_document(report)).rstrip("\n")


def format_json(report: CheckReport) -> str:
    """Machine-readable: summary counts, both runs, the rules, every comparison (and the document's blocks)."""
    return to_json(check_document(report))


FORMATS = {"text": format_text, "markdown": format_markdown, "json": format_json}
