"""Seaborn/matplotlib figures of result rows (Agg backend; PNG and SVG).

Every plotting function takes a tidy frame that already has a `series` column (a line name, from
`harness.analysis.series.series_label`) and returns a matplotlib Figure; `save` writes it as PNG and
SVG. Colours come from `harness.report.palette.series_palette`, keyed on the series label, so one series has one colour in
every figure of a report. Cells that did not finish (OOM, timeout, error, skipped) are drawn as
'x' markers on the top edge of the axes, with their status beside them; their artists carry a
`gid` of the form `failed-<status>-<series>-<x>` (an `id` in the SVG). Contended cells (their
timing disturbed by other load) are hollow circles crossed by an 'x', gid `contended-<series>-<x>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

from harness.store.schema import (
    ACTIVATION_MEM_MIB,
    EVAL_BPD,
    FLOOR_RATIO,
    GRAD_MEM_MIB,
    OPTIM_MEM_MIB,
    PARAM_MEM_MIB,
    PEAK_MEM_MIB,
    STATUS,
    STATUS_OK,
    STEP,
    TIME_MS_IQR,
    TIME_MS_MEDIAN,
    TIME_MS_SAMPLES,
    TOKENS_PER_S,
    TRAIN_BPD,
)

matplotlib.use("Agg")

import matplotlib.legend  # noqa: E402
import matplotlib.text  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from harness.analysis.series import is_log_axis  # noqa: E402
from harness.analysis.tables import is_contended  # noqa: E402
from harness.report.figure_axes import (  # noqa: E402
    DPI,
    FIGSIZE,
    contended_handle,
    format_count,
    format_plain,
    format_si,
    legend_labels,
    log_y,
    mark_contended,
    mark_failed,
    new_figure,
    set_title,
    theme,
    x_axis,
)
from harness.report.palette import series_order  # noqa: E402
from harness.safe_io import terminal_text  # noqa: E402

# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """How to draw one result column: `column` times `scale` in `unit`, log or linear y, IQR band."""

    column: str
    label: str
    scale: float = 1.0
    band: bool = False
    formatter: Callable[[float, Any], str] = format_plain
    timed: bool = True  # derived from the timing: contended cells are marked (memory is not)

    def values(self, rows: pd.DataFrame) -> pd.Series:
        """The column of each row in plotted units (NaN where it is not a number)."""
        return pd.to_numeric(rows[self.column], errors="coerce") * self.scale

    def band_bounds(self, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Lower/upper edges of the interquartile band of each row, in plotted units."""
        q25, q75 = zip(*(_time_quartiles(r) for _, r in rows.iterrows()))
        q25, q75 = np.asarray(q25, dtype=float), np.asarray(q75, dtype=float)
        if self.column == TIME_MS_MEDIAN:
            return q25 * self.scale, q75 * self.scale
        # throughput = work / time: scale each quartile by work = value * median time
        work = pd.to_numeric(rows[self.column], errors="coerce").to_numpy(float) * pd.to_numeric(
            rows[TIME_MS_MEDIAN], errors="coerce"
        ).to_numpy(float)
        return work / q75 * self.scale, work / q25 * self.scale


def time_quartiles(samples: Any, median: Any, iqr: Any) -> tuple[float, float]:
    """25th and 75th percentile (ms) of a cell's timing samples; median -/+ IQR/2 without samples."""
    if isinstance(samples, (list, tuple, np.ndarray)) and len(samples) >= 2:
        q25, q75 = np.percentile(np.asarray(samples, dtype=float), [25, 75])
        return float(q25), float(q75)
    median = float("nan") if median is None else float(median)
    iqr = 0.0 if iqr is None or pd.isna(iqr) else float(iqr)
    return median - iqr / 2, median + iqr / 2


def _time_quartiles(row: pd.Series) -> tuple[float, float]:
    return time_quartiles(row.get(TIME_MS_SAMPLES), row.get(TIME_MS_MEDIAN), row.get(TIME_MS_IQR))


TIME = Metric(TIME_MS_MEDIAN, "time per step (s)", scale=1e-3, band=True)
MEMORY = Metric(PEAK_MEM_MIB, "peak memory (MiB)", timed=False)
THROUGHPUT = Metric(TOKENS_PER_S, "throughput (tokens/s)", band=True, formatter=format_si)
FLOOR = Metric(FLOOR_RATIO, "time per step / compute floor")


# --------------------------------------------------------------------------- figures


def side_legend(ax: Any, title: str | None, handles: list | None = None, lower: bool = False) -> matplotlib.legend.Legend:
    """The figures' legend, outside the axes on the right (top corner, or bottom with `lower`), small
    text, no frame; `handles` labelled by `legend_labels`, or the axes' own labelled artists."""
    keys: dict[str, Any] = {"handles": handles, "labels": legend_labels(handles)} if handles is not None else {}
    return ax.legend(
        **keys,
        title=title,
        loc="lower left" if lower else "upper left",
        bbox_to_anchor=(1.02, 0.0 if lower else 1.0),
        frameon=False,
        fontsize=9,
        title_fontsize=9,
        alignment="left",
    )


def plot_metric(
    rows: pd.DataFrame,
    x: str,
    metric: Metric,
    palette: dict[str, Any],
    *,
    title: str,
    subtitle: str | None = None,
    x_label: str | None = None,
    legend_title: str | None = None,
    names: dict[str, str] | None = None,
    paper: Sequence[tuple[Any, Any]] = (),
    paper_title: str = "paper",
) -> Figure:
    """One line per `series` of `metric` against `x` (median; IQR band when `metric.band`).

    Rows whose `status` is not ok become 'x' markers on the top edge, labelled with the status.
    Contended cells (`contended`) of a `timed` metric are hollow circles crossed by an 'x', with a
    legend entry.
    `paper` is a list of (PaperSeries, colour): its read-off points drawn as hollow markers joined
    by a dashed line, in a second legend titled `paper_title`. Log-log when x is a power-of-two sweep.
    """
    names = names or {}
    style, context = theme()
    with style, context:
        fig, ax = new_figure()
        log = is_log_axis(rows[x])
        order = [s for s in series_order(rows["series"]) if s in set(rows["series"])]
        ok = rows[rows[STATUS] == STATUS_OK]
        handles: list[Any] = []
        drawn: list[float] = []  # every plotted y value (lines, bands), for the axis limits
        contended = 0  # points drawn as contended
        for series in order:
            part = ok[ok["series"] == series].sort_values(x)
            values = metric.values(part)
            keep = values.notna() & ((values > 0) if log else True)
            part, values = part[keep], values[keep]
            if part.empty:
                continue
            colour = palette.get(series, "0.3")
            (line,) = ax.plot(part[x], values, marker="o", markersize=5, lw=1.8, color=colour, label=names.get(series, series))
            handles.append(line)
            drawn += list(values)
            if metric.timed:
                contended += mark_contended(ax, part[x], values, is_contended(part), colour, series)
            if metric.band:
                low, high = metric.band_bounds(part)
                ax.fill_between(part[x].to_numpy(float), low, high, color=colour, alpha=0.2, lw=0)
                drawn += list(low) + list(high)
        paper_handles = []
        for entry, colour in paper:
            xs, ys = zip(*entry.points)
            (line,) = ax.plot(
                xs,
                ys,
                ls="--",
                lw=1.2,
                marker="o",
                markersize=7,
                markerfacecolor="none",
                markeredgewidth=1.5,
                color=colour,
                label=entry.name,
            )
            paper_handles.append(line)
        all_x = list(rows[x].dropna()) + [p for entry, _ in paper for p, _v in entry.points]
        x_axis(ax, all_x, log, x_label or x)
        if log:
            log_y(ax, metric.formatter, drawn + [y for e, _ in paper for _x, y in e.points])
        else:
            ax.set_ylim(bottom=0)
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(metric.formatter))
        ax.set_ylabel(metric.label)
        ylim = ax.get_ylim()
        failed = mark_failed(ax, rows, x, palette, names)
        ax.set_ylim(ylim)
        if failed:
            handles.append(
                Line2D([], [], ls="none", marker="x", markersize=8, mew=2, color="0.35", label="did not finish (status at top edge)")
            )
        if contended:
            handles.append(contended_handle("contended (timing disturbed by other load)"))
        legend = side_legend(ax, legend_title, handles)
        if paper_handles:
            ax.add_artist(legend)
            side_legend(ax, paper_title, paper_handles, lower=True)
        set_title(ax, title, subtitle)
        return fig


def plot_bpd_curves(
    rows: pd.DataFrame,
    palette: dict[str, Any],
    *,
    title: str,
    subtitle: str | None = None,
    legend_title: str | None = None,
    names: dict[str, str] | None = None,
) -> Figure:
    """Bits per dim against training step: `train_bpd` solid, `eval_bpd` dashed with markers."""
    names = names or {}
    style, context = theme()
    with style, context:
        fig, ax = new_figure()
        for series in series_order(rows["series"]):
            part = rows[rows["series"] == series].sort_values(STEP)
            colour = palette.get(series, "0.3")
            for column, kwargs in ((TRAIN_BPD, {"ls": "-"}), (EVAL_BPD, {"ls": "--", "marker": "o", "markersize": 4})):
                if column in part and part[column].notna().any():
                    points = part[part[column].notna()]
                    ax.plot(
                        points[STEP],
                        points[column],
                        color=colour,
                        lw=1.6,
                        label=f"{names.get(series, series)} ({column.split('_')[0]})",
                        **kwargs,
                    )
        ax.set_xlabel("training step")
        ax.set_ylabel("bits per dim (bits/symbol)")
        side_legend(ax, legend_title)
        set_title(ax, title, subtitle)
        return fig


# The memory breakdown of a cell (MiB columns, bottom to top of a stacked bar) and their names.
MEMORY_PARTS = (
    (PARAM_MEM_MIB, "parameters"),
    (GRAD_MEM_MIB, "gradients"),
    (OPTIM_MEM_MIB, "optimizer state"),
    (ACTIVATION_MEM_MIB, "activations and temporaries"),
)
MEMORY_PART_COLOURS = ("#9ecae1", "#4292c6", "#08519c", "#fd8d3c")


def plot_memory_breakdown(
    rows: pd.DataFrame, x: str, *, title: str, subtitle: str | None = None, x_label: str | None = None, names: dict[str, str] | None = None
) -> Figure:
    """Stacked bars of MEMORY_PARTS (MiB) against `x`, one panel per series (shared y axis).

    rows: finished cells with a `series` column and the MEMORY_PARTS columns (a missing part is 0).
    """
    names = names or {}
    series_list = series_order(rows["series"])
    style, context = theme()
    with style, context:
        width = max(FIGSIZE[0], 3.2 * len(series_list) + 2.5)
        fig = Figure(figsize=(width, FIGSIZE[1]), dpi=DPI)
        axes = fig.subplots(1, len(series_list), sharey=True, squeeze=False)[0]
        for ax, series in zip(axes, series_list):
            part = rows[rows["series"] == series].sort_values(x)
            positions = range(len(part))
            bottom = pd.Series(0.0, index=part.index)
            for (column, label), colour in zip(MEMORY_PARTS, MEMORY_PART_COLOURS):
                heights = pd.to_numeric(part.get(column, pd.Series(0.0, index=part.index)), errors="coerce").fillna(0.0)
                ax.bar(positions, heights, bottom=bottom, color=colour, width=0.7, label=label)
                bottom = bottom + heights
            ax.set_xticks(list(positions), [format_count(v) for v in part[x]])
            ax.set_xlabel(x_label or x)
            ax.set_title(names.get(series, series), fontsize=10, loc="left")
        axes[0].set_ylabel("memory (MiB)")
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=9, alignment="left")
        fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11, x=0.02, ha="left")
        return fig


def plot_accuracy_grid(table: pd.DataFrame, *, title: str, subtitle: str | None = None) -> Figure:
    """Heat map of accuracy (%) with rows = trained with, columns = evaluated with."""
    style, context = theme()
    with style, context:
        fig, ax = new_figure((1.2 * len(table.columns) + 3.0, 0.6 * len(table.index) + 2.0))
        sns.heatmap(table.astype(float), annot=True, fmt=".1f", cmap="crest", vmin=0, vmax=100, ax=ax, cbar_kws={"label": "accuracy (%)"})
        ax.set_xlabel("evaluated with")
        ax.set_ylabel("trained with")
        ax.tick_params(axis="y", labelrotation=0)
        set_title(ax, title, subtitle)
        return fig


def plot_ratio(
    rows: pd.DataFrame,
    x: str,
    palette: dict[str, Any],
    *,
    title: str,
    subtitle: str | None = None,
    y_label: str = "time ratio B / A",
    x_label: str | None = None,
    legend_title: str | None = None,
    names: dict[str, str] | None = None,
) -> Figure:
    """Ratio per matched cell (`ratio` column) against `x`, one line per series; filled markers
    for differences beyond noise (`within_noise` False), hollow ones within noise (True), crossed
    hollow ones for `inconclusive` (contended) cells, none where the repeats were too few to tell
    (`within_noise` None); a reference line at 1;
    cells that did not finish in either run (`status` not ok) as 'x' on the top edge."""
    names = names or {}
    style, context = theme()
    with style, context:
        fig, ax = new_figure()
        ax.axhline(1.0, color="0.4", lw=1, ls=":")
        handles: list[Any] = []
        inconclusive = untold = 0
        for series in series_order(rows["series"]):
            part = rows[(rows["series"] == series) & rows["ratio"].notna()].sort_values(x)
            if part.empty:
                continue
            colour = palette.get(series, "0.3")
            (line,) = ax.plot(part[x], part["ratio"], color=colour, lw=1.4, label=names.get(series, series))
            handles.append(line)
            noise = part["within_noise"].astype(object).eq(True)
            vague = part["inconclusive"].astype(object).eq(True) if "inconclusive" in part else pd.Series(False, index=part.index)
            inconclusive += mark_contended(ax, part[x], part["ratio"], vague, colour, series)
            beyond = part["within_noise"].astype(object).eq(False) & ~vague
            untold += int((~noise & ~beyond & ~vague).sum())
            ax.plot(part.loc[beyond, x], part.loc[beyond, "ratio"], ls="none", marker="o", color=colour, markersize=6)
            ax.plot(
                part.loc[noise, x],
                part.loc[noise, "ratio"],
                ls="none",
                marker="o",
                markersize=6,
                markerfacecolor="white",
                markeredgecolor=colour,
                markeredgewidth=1.5,
            )
        handles += [
            Line2D([], [], ls="none", marker="o", color="0.3", label="difference beyond noise"),
            Line2D([], [], ls="none", marker="o", markerfacecolor="white", markeredgecolor="0.3", label="within noise"),
        ]
        if inconclusive:
            handles.append(contended_handle("inconclusive (contended in A or B)"))
        if untold:
            handles.append(Line2D([], [], color="0.3", lw=1.4, label="no marker: too few repeats to tell"))
        x_axis(ax, rows[x].dropna(), is_log_axis(rows[x]), x_label or x)
        ratios = rows["ratio"].dropna()
        if not ratios.empty:
            low, high = min(ratios.min(), 1.0), max(ratios.max(), 1.0)
            if high / low > 3:  # wide spread: log scale, so 0.5x and 2x sit symmetric around 1
                ax.set_yscale("log")
                ax.set_ylim(low / 1.1, high * 1.1)
                log_y(ax, format_plain)
            else:
                pad = max(0.05, 0.1 * (high - low))
                ax.set_ylim(low - pad, high + pad)
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(format_plain))
        ax.set_ylabel(y_label)
        ylim = ax.get_ylim()
        if mark_failed(ax, rows, x, palette, names):
            handles.append(Line2D([], [], ls="none", marker="x", markersize=8, mew=2, color="0.35", label="did not finish in A or B"))
        ax.set_ylim(ylim)
        side_legend(ax, legend_title, handles)
        set_title(ax, title, subtitle)
        return fig


def save(fig: Figure, folder: Path, stem: str) -> list[Path]:
    """Write `fig` as <stem>.png and <stem>.svg (reproducible SVG ids, no date) and return both paths.
    Every text of the figure has its control characters escaped first (`terminal_text`): labels come
    from runs, and one such character would make the SVG malformed XML. Tick labels exist only once
    the figure is drawn (formatters write them): those that change are fixed in place escaped."""
    for text in fig.findobj(matplotlib.text.Text):
        text.set_text(terminal_text(text.get_text()))
    fig.draw_without_rendering()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [label.get_text() for label in axis.get_majorticklabels()]
            shown = [terminal_text(label) for label in labels]
            if shown != labels:
                axis.set_major_locator(ticker.FixedLocator(axis.get_majorticklocs()))
                axis.set_major_formatter(ticker.FixedFormatter(shown))
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.png", folder / f"{stem}.svg"]
    legends = [a for ax in fig.axes for a in ax.get_children() if isinstance(a, matplotlib.legend.Legend)]
    with matplotlib.rc_context({"svg.hashsalt": "reformer-harness", "svg.fonttype": "none"}):
        fig.savefig(paths[0], dpi=DPI, bbox_inches="tight", bbox_extra_artists=legends, metadata={"Software": None})
        fig.savefig(paths[1], bbox_inches="tight", bbox_extra_artists=legends, metadata={"Date": None, "Creator": None})
    return paths
