"""`harness history SUITE`: a figure and tables per device of one metric across a suite's runs, with the
step changes between consecutive code versions (harness.analysis.history), as blocks of the document
model; `render_history` writes them to report.md and index.html, `harness publish` puts them on a page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib import ticker
from matplotlib.lines import Line2D

from harness.analysis.catalog import find_runs
from harness.analysis.history import STEP_THRESHOLD, History, Metric, build_histories
from harness.analysis.pairing import KEY, NOISE_ALPHA
from harness.expressions import ExpressionError
from harness.report import figures
from harness.report.document import Block, Document, Figure, Heading, Items, Paragraph, Table, write_document
from harness.report.figure_axes import new_figure, set_title, slug, theme
from harness.report.folders import RESULTS_ROOT, output_folder, reports_root, staged, writing
from harness.report.palette import series_palette
from harness.safe_io import terminal_text
from harness.store.files import ResultsError
from harness.store.schema import RUN_ID
from harness.store.versions import version_sha

STEP_COLOUR = "#d62728"


def short_version(version: str) -> str:
    """A code version as an axis label: its commit's first 8 hex, else its first 12 characters."""
    sha = version_sha(version)
    return sha[:8] if sha else version[:12]


def run_columns(history: History) -> list[str]:
    """One column name per run, in x-axis order: "<short version> <run id's timestamp>"."""
    return [f"{short_version(e.run.code_version)} {e.run.run_id[:16]}" for e in history.runs]


def plot_history(history: History, folder: Path, stem: str, links: dict[str, str] | None = None) -> None:
    """One line per configuration over the runs (x: the runs in code-version order, labelled by short
    version), hollow points contended or noisy, red rings on the points after a step; with `links`
    (run id -> relative URL) every point of the SVG links to its run's report."""
    points = history.points
    palette = series_palette(points["label"])
    stepped = {(s.key, s.after) for s in history.steps}
    style, context = theme()
    with style, context:
        fig, ax = new_figure((9.0, 5.0))
        for label, part in points.groupby("label", sort=False):
            part = part.sort_values("position")
            colour = palette.get(label, "0.3")
            ax.plot(part["position"], part["value"], color=colour, lw=1.2)
            for hollow in (False, True):
                some = part[part["hollow"] == hollow]
                if some.empty:
                    continue
                marks = ax.scatter(
                    some["position"], some["value"], s=28, color="white" if hollow else colour, edgecolors=colour, linewidths=1.4, zorder=3
                )
                if links:
                    marks.set_urls([links.get(run_id) for run_id in some[RUN_ID]])
            ring = part[[(k, v) in stepped for k, v in zip(part[KEY], part["version"])]]
            ax.scatter(ring["position"], ring["value"], s=140, facecolors="none", edgecolors=STEP_COLOUR, linewidths=2, zorder=4)
        ax.set_xticks(range(len(history.runs)), [short_version(e.run.code_version) for e in history.runs], rotation=45, ha="right")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))  # plain text, no math text
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("run (code version; commit order where git knows it, else run start)")
        ax.set_ylabel(f"{history.metric.name} ({history.metric.unit})" if history.metric.unit else history.metric.name)
        set_title(ax, f"{history.suite}: {history.metric.name} per configuration", history.device)
        handles = [
            Line2D([], [], ls="none", marker="o", color="0.3", label="point (links to its run's report in the SVG)"),
            Line2D([], [], ls="none", marker="o", markerfacecolor="white", markeredgecolor="0.3", label="contended or noisy"),
            Line2D([], [], ls="none", marker="o", markersize=11, markerfacecolor="none", markeredgecolor=STEP_COLOUR, label="step change"),
        ]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        figures.save(fig, folder, stem)
        plt.close(fig)


def steps_table(history: History) -> Table:
    """The step changes: configuration, versions, commit range, ratio, interval, p, worse or better."""
    rows = [
        {
            "configuration": s.label,
            "from": short_version(s.before),
            "to": short_version(s.after),
            "commits": s.commits,
            "after / before": f"{s.ratio:.3f}",
            "95% interval": f"{s.interval[0]:.3f}-{s.interval[1]:.3f}" if s.interval[0] == s.interval[0] else "",
            "p": f"{s.p_value:.2g}" if s.p_value is not None else "",
            "change": "WORSE" if s.worse else "better",
        }
        for s in history.steps
    ]
    return Table(pd.DataFrame(rows), index=False, emphasis=tuple(s.worse for s in history.steps), text="columns")


def values_table(history: History) -> Table:
    """Configuration x run: the metric as stored (contended or noisy values marked *)."""
    columns = dict(zip([e.run.run_id for e in history.runs], run_columns(history)))
    shown = history.points.assign(text=[f"{v:.4g}" + ("*" if h else "") for v, h in zip(history.points["value"], history.points["hollow"])])
    table = shown.pivot_table(index="label", columns=RUN_ID, values="text", aggfunc="first", sort=False)
    table = table.reindex(columns=[c for c in columns if c in table.columns]).rename(columns=columns)
    table.index.name, table.columns.name = "configuration", None
    return Table(table.fillna(""))


def history_blocks(history: History, folder: Path, stem: str, links: dict[str, str] | None = None, level: int = 2) -> list[Block]:
    """The blocks of one device's history (its figure drawn into `folder` as `stem`)."""
    rule = (
        f"A step change is a change between consecutive code versions beyond noise (p < {history.alpha:g}: {history.drift.text()}; "
        f"the within-run Mann-Whitney test on the pooled samples must not say within) and beyond {history.threshold:.0%}. "
        f"Values: the median over a version's runs; {history.calibration}."
    )
    versions = ", ".join(f"{short_version(v)} ({len(runs)} run{'s' if len(runs) > 1 else ''})" for v, runs in history.versions)
    blocks: list[Block] = [
        Heading(level=level, text=f"{history.device}: {history.metric.name}"),
        Paragraph(f"{len(history.runs)} run(s), code versions in order: {versions}."),
        Paragraph(rule),
    ]
    if history.points.empty:
        return blocks + [Paragraph(f"No finished cell has a value of `{history.metric.column}`.")]
    plot_history(history, folder, stem, links)
    blocks.append(Figure(stem, f"{history.metric.name} of every configuration over the runs; red rings: step changes."))
    worse = len([s for s in history.steps if s.worse])
    blocks.append(
        Paragraph(f"{len(history.steps)} step change(s), {worse} for the worse.")
        if history.steps
        else Paragraph("No step change between consecutive code versions.")
    )
    if history.steps:
        blocks.append(steps_table(history))
    blocks.append(values_table(history))
    if links:
        blocks.append(
            Items(tuple(f"[{col}]({links[e.run.run_id]})" for e, col in zip(history.runs, run_columns(history)) if e.run.run_id in links))
        )
    return blocks


def load_histories(
    suite: str, root: str | Path, metric: Metric, selection: str | None, threshold: float = STEP_THRESHOLD, alpha: float = NOISE_ALPHA
) -> list[History]:
    """The histories of `suite` under `root` (ResultsError when it has no runs or `selection` is bad)."""
    entries = find_runs(root, suite)
    if not [e for e in entries if not e.baseline]:
        raise ResultsError(f"{root}: no runs of suite {suite!r} (harness runs lists them)")
    try:
        return build_histories(entries, metric, selection, threshold, alpha)
    except ExpressionError as error:
        raise ResultsError(f"--filter: {error}") from None


def history_document(histories: Sequence[History], folder: Path, links: dict[str, str] | None = None) -> Document:
    """The whole history document of one suite (all devices); figures drawn into `folder`."""
    first = histories[0]
    blocks: list[Block] = [Heading(level=1, text=f"History: {first.suite}, {first.metric.name}")]
    for history in histories:
        blocks += history_blocks(history, folder, f"history_{slug(history.device)}", links)
    return Document(f"history {first.suite}", blocks)


def render_history(histories: Sequence[History], root: str | Path = RESULTS_ROOT, out: Path | None = None) -> Path:
    """Write report.md and index.html of `histories` into `out` (default reports/history/<suite>/)."""
    first = histories[0]
    folder = Path(out) if out is not None else output_folder(reports_root(root) / "history", (first.suite, "suite name", Path(root)))
    with writing(folder), staged(folder) as staging:
        write_document(history_document(histories, staging), staging)
    return folder


def summary_lines(history: History) -> list[str]:
    """What the terminal shows of one device's history: versions, drift and each step (labels, device
    names and versions come from runs: control characters escaped, `terminal_text`)."""
    lines = [
        f"{history.suite} on {history.device}: {len(history.runs)} run(s), {len(history.versions)} code version(s), "
        f"{len(set(history.points[KEY])) if not history.points.empty else 0} configurations; {history.drift.text()}; "
        f"{len(history.steps)} step change(s) beyond noise and beyond {history.threshold:.0%}"
    ]
    for s in history.steps:
        lines.append(
            f"  {'WORSE' if s.worse else 'better'}: {s.label}: {s.ratio:.3f}x from {short_version(s.before)} to {short_version(s.after)} "
            f"({s.commits}), p={s.p_value:.2g}"
        )
    return [terminal_text(line) for line in lines]
