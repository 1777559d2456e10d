"""`harness check RUN --targets`: the suite's absolute targets (harness.analysis.targets) as text."""

from __future__ import annotations

import math

import pandas as pd

from harness.report.document import Document, Heading, Paragraph, Table, to_text


def targets_document(table: pd.DataFrame, source: str) -> Document:
    """The rows of `evaluate_targets` (MET, MISSED or INCONCLUSIVE each) under where the targets came
    from, with a one-line verdict under the table."""
    if table.empty:
        return Document("targets", [Paragraph(f"no targets in {source}")])
    met = [("INCONCLUSIVE" if vague else "MET" if ok else "MISSED") for ok, vague in zip(table["met"], table["inconclusive"])]
    shown = table.drop(columns="inconclusive").assign(value=table["value"].map(lambda v: f"{v:.3f}" if math.isfinite(v) else "-"), met=met)
    vague = int(table["inconclusive"].sum())
    missed = int((~table["met"] & ~table["inconclusive"]).sum())
    verdict = f"{int(table['met'].sum())} of {len(table)} met" + (f"; {missed} missed" if missed else "")
    verdict += f"; {vague} inconclusive (contended cells: neither met nor missed)" if vague else ""
    return Document("targets", [Heading(f"targets from {source}"), Table(shown, index=False, note=verdict)])


def format_targets(table: pd.DataFrame, source: str) -> str:
    """Plain-text table of evaluate_targets' rows and a one-line verdict."""
    return to_text(targets_document(table, source))
