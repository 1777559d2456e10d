"""The roofline of a benchmark run and its forward / backward split: `roofline_sections`.

Each finished cell is drawn once per phase (forward, backward; a cell stored before the phases
were timed apart, as one "whole step" point) at its arithmetic intensity (analytic FLOPs over analytic
bytes moved, FLOP/byte) and its achieved rate (GFLOP/s), on log axes, under the two roofs measured
in the run: the matmul rate (`matmul_gflops`, the compute roof) and the streaming bandwidth
(`membw_gbytes_per_s`, the memory roof, a line of slope 1 up to the ridge point). Colour: the
series; marker: the phase; hollow: a contended cell.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from harness.analysis.series import primary_axis, with_series
from harness.analysis.tables import is_contended, pivot_metric
from harness.cells.benchmark_rows import roofline_point
from harness.report import figures
from harness.report.document import Block, Figure, Heading, Paragraph, Table
from harness.report.figure_axes import new_figure
from harness.report.labels import legend_names, what_was_measured
from harness.report.palette import series_order
from harness.store.schema import (
    BACKWARD_BYTES,
    BACKWARD_FLOPS,
    BACKWARD_MS_MEDIAN,
    BOUND,
    BYTES,
    CONTENDED,
    FLOPS,
    FORWARD_BYTES,
    FORWARD_FLOPS,
    FORWARD_MS_MEDIAN,
    INTENSITY,
    MATMUL_GFLOPS,
    MEMBW_GBYTES_PER_S,
    ROOF_FRACTION,
    STATUS,
    STATUS_OK,
    TIME_MS_MEDIAN,
)

WHOLE = "whole step"  # not a column: the phase of a cell stored before its phases were timed apart
PHASE_MARKERS = {"forward": "o", "backward": "^", WHOLE: "s"}  # not columns: phase -> matplotlib marker
PHASE_SOURCES = {  # not columns: phase -> (its FLOPs, bytes and median-time columns)
    "forward": (FORWARD_FLOPS, FORWARD_BYTES, FORWARD_MS_MEDIAN),
    "backward": (BACKWARD_FLOPS, BACKWARD_BYTES, BACKWARD_MS_MEDIAN),
    WHOLE: (FLOPS, BYTES, TIME_MS_MEDIAN),
}


def _number(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) and value > 0 else math.nan


def run_roofs(rows: pd.DataFrame) -> tuple[float, float]:
    """(compute roof GFLOP/s, memory roof GB/s) of a run: the medians of its finished cells'
    measured `matmul_gflops` and `membw_gbytes_per_s` (NaN where it measured none)."""
    finished = rows[rows[STATUS] == STATUS_OK]
    roofs = []
    for column in (MATMUL_GFLOPS, MEMBW_GBYTES_PER_S):
        values = pd.to_numeric(finished[column], errors="coerce").dropna() if column in finished else pd.Series(dtype=float)
        roofs.append(float(values.median()) if len(values) else math.nan)
    return roofs[0], roofs[1]


def roofline_points(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per finished cell and phase with analytic bytes: series (for the primary axis),
    the axis value, phase, intensity (FLOP/byte), achieved GFLOP/s, bound, fraction of that roof,
    contended. Phases with FLOPs but no time or bytes are left out; cells without the phase columns
    give one "whole step" point from their totals."""
    x = primary_axis(rows)
    frame = with_series(rows[rows[STATUS] == STATUS_OK], x)
    gflops_roof, gbytes_roof = run_roofs(rows)
    contended = is_contended(frame)
    points = []
    for (_, row), busy in zip(frame.iterrows(), contended):
        phased = not math.isnan(_number(row.get(FORWARD_MS_MEDIAN))) and not math.isnan(_number(row.get(FORWARD_BYTES)))
        for phase in ("forward", "backward") if phased else (WHOLE,):
            flops_column, bytes_column, time_column = PHASE_SOURCES[phase]
            flops, moved, ms = (_number(row.get(c)) for c in (flops_column, bytes_column, time_column))
            if any(math.isnan(v) for v in (flops, moved, ms)):
                continue
            point = roofline_point(flops, moved, ms / 1e3, gflops_roof, gbytes_roof)
            points.append(
                {
                    "series": row["series"],
                    x: row[x],
                    "phase": phase,
                    INTENSITY: point[INTENSITY],
                    "gflops_per_s": flops / (ms / 1e3) / 1e9,
                    "bound": point[BOUND],
                    ROOF_FRACTION: point[ROOF_FRACTION],
                    CONTENDED: bool(busy),
                }
            )
    return pd.DataFrame(points)


def plot_roofline(
    points: pd.DataFrame, gflops_roof: float, gbytes_roof: float, palette: dict[str, Any], *, title: str, names: dict[str, str]
) -> Any:
    """The roofline figure (log-log): the roofs, then one marker per point (colour: series, marker:
    phase, hollow: contended). Returns a matplotlib Figure."""
    from matplotlib import ticker
    from matplotlib.lines import Line2D

    fig, ax = new_figure()
    low = min(points[INTENSITY].min(), gflops_roof / gbytes_roof if gbytes_roof > 0 else math.inf) / 2
    high = max(points[INTENSITY].max(), gflops_roof / gbytes_roof if gbytes_roof > 0 else 0) * 2
    if math.isfinite(gflops_roof) and math.isfinite(gbytes_roof):
        ridge = gflops_roof / gbytes_roof
        xs = [low, ridge, high] if low < ridge < high else [low, high]
        ax.plot(xs, [min(gflops_roof, x * gbytes_roof) for x in xs], color="black", linewidth=1.5, zorder=1)
        ax.annotate(f"compute roof {gflops_roof:,.0f} GFLOP/s", (high, gflops_roof), ha="right", va="bottom", fontsize=8)
        ax.annotate(f"memory roof {gbytes_roof:,.1f} GB/s", (low, low * gbytes_roof), ha="left", va="bottom", fontsize=8, rotation=30)
    for (series, phase), group in points.groupby(["series", "phase"], sort=False):
        colour = palette.get(series, "grey")
        for hollow, part in group.groupby(CONTENDED):
            ax.scatter(
                part[INTENSITY],
                part["gflops_per_s"],
                marker=PHASE_MARKERS[phase],
                s=42,
                facecolors="none" if hollow else colour,
                edgecolors=colour,
                zorder=3,
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("arithmetic intensity (FLOP / byte, analytic)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    handles = [
        Line2D([], [], linestyle="", marker="o", color=palette.get(s, "grey"), label=names.get(s, s))
        for s in series_order(points["series"])
    ]
    handles += [
        Line2D([], [], linestyle="", marker=PHASE_MARKERS[p], color="black", markerfacecolor="none", label=p)
        for p in dict.fromkeys(points["phase"])
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    ax.set_title(title, fontsize=10, loc="left")
    return fig


def phase_table(rows: pd.DataFrame, x: str) -> pd.DataFrame:
    """Series x `x`: "forward + backward = sum (total)" in ms per finished cell with both phases."""

    def shown(row: pd.Series) -> str:
        forward, backward, total = (_number(row.get(c)) for c in (FORWARD_MS_MEDIAN, BACKWARD_MS_MEDIAN, TIME_MS_MEDIAN))
        if math.isnan(forward) or math.isnan(backward):
            return "" if row[STATUS] == STATUS_OK else str(row[STATUS]).upper()
        return f"{forward:.3g} + {backward:.3g} = {forward + backward:.3g} ({total:.3g})"

    frame = with_series(rows, x)
    frame = frame.assign(shown=frame.apply(shown, axis=1))
    order = list(dict.fromkeys(frame["series"]))
    return frame.pivot_table(index="series", columns=x, values="shown", aggfunc="last").reindex(order).fillna("")


def roofline_sections(rows: pd.DataFrame, folder: Path, palette: dict[str, Any]) -> list[Block]:
    """ "Forward and backward" (when the cells timed their phases apart) and "Roofline" (when they
    have analytic bytes) sections of a benchmark run, the figure drawn into `folder`."""
    blocks: list[Block] = []
    x = primary_axis(rows)
    if BACKWARD_MS_MEDIAN in rows and pd.to_numeric(rows[BACKWARD_MS_MEDIAN], errors="coerce").notna().any():
        blocks += [
            Heading(level=2, text="Forward and backward"),
            Paragraph(
                "Median forward and backward phase of each cell (ms), timed apart within the same repeats as the "
                "total (one more clock reading between them), their sum, and in brackets the median total "
                "(`time_ms_median`); the backward phase includes the optimizer step in mode train_step. "
                "Medians of parts need not add up to the median of the whole, but within noise they do."
            ),
            Table(phase_table(rows, x)),
        ]
    points = roofline_points(rows) if BYTES in rows else pd.DataFrame()
    if points.empty:
        return blocks
    gflops_roof, gbytes_roof = run_roofs(rows)
    measured = math.isfinite(gflops_roof) and math.isfinite(gbytes_roof)
    roofs = (
        f"compute roof {gflops_roof:,.1f} GFLOP/s (matmul), memory roof {gbytes_roof:,.1f} GB/s (triad), ridge at "
        f"{gflops_roof / gbytes_roof:.3g} FLOP/byte"
        if measured
        else "the roofs were not measured in this run (the suite's `measure.matmul_rate` / `measure.bandwidth`)"
    )
    text = (
        "Arithmetic intensity (analytic FLOPs over analytic bytes read and written, variants/traffic.py) against "
        f"achieved GFLOP/s per cell and phase, on log axes; {roofs}, both measured in the cells' own processes "
        "(the medians over the run's cells). A point's bound is the roof above it at its intensity (memory left "
        "of the ridge, compute right of it); `roof_fraction` is its rate over that roof."
    )
    blocks += [Heading(level=2, text="Roofline"), Paragraph(text)]
    if measured:
        frame = with_series(rows, x)
        _, names = legend_names(frame)
        title = f"Roofline ({what_was_measured(rows)})"
        fig = plot_roofline(points, gflops_roof, gbytes_roof, palette, title=title, names=names)
        figures.save(fig, folder, "roofline")
        blocks.append(Figure("roofline", f"{title}. Colour: series; marker: phase (circle forward, triangle backward); hollow: contended."))
    blocks += [
        Paragraph("Fraction of the bounding roof each cell reached, whole step (`roof_fraction`; * contended):"),
        Table(pivot_metric(rows, ROOF_FRACTION, columns=x, fmt="{:.2f}", mark_contended=True)),
        Paragraph("The roof that bounds each cell at its intensity (`roof_bound`):"),
        Table(pivot_metric(rows, BOUND, columns=x, fmt="{}")),
    ]
    return blocks
