"""Seaborn/matplotlib figures of result rows (Agg backend; PNG and SVG).

Every plotting function takes a tidy frame that already has a `series` column (a line name, from
`harness.tables.series_label`) and returns a matplotlib Figure; `save` writes it as PNG and SVG.
Colours come from `series_palette`, keyed on the series label, so one series has one colour in
every figure of a report. Cells that did not finish (OOM, timeout, error, skipped) are drawn as
'x' markers on the top edge of the axes, with their status beside them; their artists carry a
`gid` of the form `failed-<status>-<series>-<x>` (an `id` in the SVG). Contended cells (their
timing disturbed by other load) are hollow circles crossed by an 'x', gid `contended-<series>-<x>`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")

import matplotlib.legend  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from harness.tables import is_contended  # noqa: E402

# Variant families first in this order (then alphabetically); only an ordering, colours are derived.
DEFAULT_ORDER = ("full", "sdpa", "lsh")
# Families with a single series: distinct fixed colours in family order (near-black first).
SINGLE_COLOURS = ("#222222", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
# Families whose series differ by numbers (n_hashes, d_ff, ...): one sequential palette each.
SEQUENTIAL = ("crest", "Oranges", "Greens", "Purples", "Blues")
# Families whose series differ by words (residual=standard/reversible): qualitative colours.
QUALITATIVE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#17becf", "#bcbd22", "#e377c2")
FIGSIZE = (8.5, 5.0)
DPI = 150


# --------------------------------------------------------------------------- palette


_NUMBER = r"\d+(?:\.\d+)?"


def _variant(label: str) -> str:
    """The leading name of a label, lower case, without digits: "lsh n_hashes=4" and "LSH-4" -> "lsh"."""
    match = re.match(r"[A-Za-z_]+", label)
    return match.group().lower() if match else label


def _family(label: str) -> str:
    """The label with its numbers blanked: "lsh n_hashes=4" -> "lsh n_hashes=#", "LSH-4" -> "LSH-#";
    labels of one family differ only by numbers (or are one series each)."""
    first, _, rest = label.partition(" ")
    return " ".join([re.sub(_NUMBER, "#", first)] + re.findall(r"(\w+)=", rest))


def _numbers(label: str) -> tuple[float, ...]:
    """The numbers of a label in order: numbers in its first word ("LSH-4"), then numeric `key=value`s."""
    first, _, rest = label.partition(" ")
    found = re.findall(_NUMBER, first) + re.findall(rf"=({_NUMBER})(?=\s|$)", " " + rest)
    return tuple(float(v) for v in found)


def _family_rank(family: str) -> tuple[int, str]:
    variant = _variant(family)
    return (DEFAULT_ORDER.index(variant) if variant in DEFAULT_ORDER else len(DEFAULT_ORDER), family)


def series_order(labels: Iterable[str]) -> list[str]:
    """Labels sorted by family (DEFAULT_ORDER, then name), then by their numbers, then by text."""
    return sorted(set(labels), key=lambda s: (_family_rank(_family(s)), _numbers(s), s))


def series_palette(labels: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """Colour per series label, derived from the labels alone.

    A family (variant name and the parameter names in the label) with one series gets a fixed colour from SINGLE_COLOURS; a family
    of several series that differ only by numbers gets a sequential palette ordered by those numbers
    (light = small, e.g. LSH n_hashes=1 .. 8); one whose series differ by words gets qualitative
    colours. Pass every label of a report at once so that colours agree between its figures (the same labels always get the same colours).
    """
    ordered = series_order(labels)
    families: dict[str, list[str]] = {}
    for label in ordered:
        families.setdefault(_family(label), []).append(label)
    palette: dict[str, tuple[float, float, float]] = {}
    singles = sequential = qualitative = 0
    for members in families.values():
        if len(members) == 1:
            palette[members[0]] = matplotlib.colors.to_rgb(SINGLE_COLOURS[singles % len(SINGLE_COLOURS)])
            singles += 1
        elif all(_numbers(m) for m in members) and len({_numbers(m) for m in members}) == len(members):
            cmap = sns.color_palette(SEQUENTIAL[sequential % len(SEQUENTIAL)], as_cmap=True)
            colours = [matplotlib.colors.to_rgb(cmap(p)) for p in np.linspace(0.2, 0.95, len(members))]
            palette.update(zip(members, colours))
            sequential += 1
        else:
            for member in members:
                palette[member] = matplotlib.colors.to_rgb(QUALITATIVE[qualitative % len(QUALITATIVE)])
                qualitative += 1
    return palette


# --------------------------------------------------------------------------- axes helpers


def is_log_axis(values: Iterable[Any]) -> bool:
    """Log base 2 for sweeps of powers of two spanning at least 4x (1K..32K tokens, 1/4/16 chunks)."""
    numbers = [float(v) for v in values if v is not None and not pd.isna(v)]
    if len(set(numbers)) < 2 or min(numbers) <= 0:
        return False
    powers = all(float(v).is_integer() and (int(v) & (int(v) - 1)) == 0 for v in numbers)
    return powers and max(numbers) / min(numbers) >= 4


def format_count(value: float) -> str:
    """1024 -> '1K', 32768 -> '32K', 1048576 -> '1M', 12 -> '12'."""
    for size, suffix in ((1 << 20, "M"), (1 << 10, "K")):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{suffix}"
    return f"{value:g}"


def format_si(value: float, _pos: Any = None) -> str:
    """Decimal SI: 5e6 -> '5M', 2.5e5 -> '250K', 0.05 -> '0.05'."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def format_plain(value: float, _pos: Any = None) -> str:
    """Plain decimals for log axes: 0.005, 0.1, 2, 1,000, 20,000 (never 1e+04)."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.6g}"


def _nice_log_limits(low: float, high: float, subs: Sequence[float], reach: float = 1.4) -> tuple[float, float]:
    """Widen (low, high) to the nearest tick of a log axis with mantissas `subs` outside it when that
    tick is within a factor `reach` (so the ends carry a label), else by 8% only."""
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 2) for m in subs]
    below = max(t for t in ticks if t <= low * 1.0001)
    above = min(t for t in ticks if t >= high * 0.9999)
    return (below if low / below <= reach else low / 1.08), (above if above / high <= reach else high * 1.08)


def _log_y(ax: plt.Axes, formatter: Callable[[float, Any], str], data: Sequence[float] = ()) -> None:
    """Log y axis with labelled ticks at 1-2-5 (or decades for wide ranges); with `data`, the limits
    are widened to the ticks just outside it so both ends carry a label."""
    ax.set_yscale("log")
    values = [v for v in data if v > 0 and math.isfinite(v)]
    low, high = (min(values), max(values)) if values else ax.get_ylim()
    decades = math.log10(high / low) if low > 0 else 10
    subs = (1.0, 2.0, 5.0) if decades <= 3.5 else (1.0,)
    if values:
        ax.set_ylim(*_nice_log_limits(low / 1.05, high * 1.05, subs))
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(formatter))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _x_axis(ax: plt.Axes, values: Sequence[float], log: bool, label: str) -> None:
    values = sorted(set(float(v) for v in values))
    if log:
        ax.set_xscale("log", base=2)
        pad = 2**0.25
        ax.set_xlim(values[0] / pad, values[-1] * pad)
    else:
        span = (values[-1] - values[0]) or 1.0
        ax.set_xlim(values[0] - 0.05 * span, values[-1] + 0.05 * span)
    ax.xaxis.set_major_locator(ticker.FixedLocator(values))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _p: format_count(v)))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel(label)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


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
        return pd.to_numeric(rows[self.column], errors="coerce") * self.scale

    def band_bounds(self, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Lower/upper edges of the interquartile band of each row, in plotted units."""
        q25, q75 = zip(*(_time_quartiles(r) for _, r in rows.iterrows()))
        q25, q75 = np.asarray(q25, dtype=float), np.asarray(q75, dtype=float)
        if self.column == "time_ms_median":
            return q25 * self.scale, q75 * self.scale
        # throughput = work / time: scale each quartile by work = value * median time
        work = pd.to_numeric(rows[self.column], errors="coerce").to_numpy(float) * pd.to_numeric(
            rows["time_ms_median"], errors="coerce"
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
    return time_quartiles(row.get("time_ms_samples"), row.get("time_ms_median"), row.get("time_ms_iqr"))


TIME = Metric("time_ms_median", "time per step (s)", scale=1e-3, band=True)
MEMORY = Metric("peak_mem_mib", "peak memory (MiB)", timed=False)
THROUGHPUT = Metric("tokens_per_s", "throughput (tokens/s)", band=True, formatter=format_si)
FLOOR_RATIO = Metric("floor_ratio", "time per step / compute floor")


# --------------------------------------------------------------------------- figures


def _theme() -> Any:
    """Seaborn style and context for every figure (restored afterwards)."""
    return sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85)


def _new_figure(size: tuple[float, float] = FIGSIZE) -> tuple[Figure, plt.Axes]:
    fig = Figure(figsize=size, dpi=DPI)
    ax = fig.add_subplot()
    return fig, ax


def _title(ax: plt.Axes, title: str, subtitle: str | None) -> None:
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11, loc="left")


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
    style, context = _theme()
    with style, context:
        fig, ax = _new_figure()
        log = is_log_axis(rows[x])
        order = [s for s in series_order(rows["series"]) if s in set(rows["series"])]
        ok = rows[rows["status"] == "ok"]
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
                contended += _mark_contended(ax, part[x], values, is_contended(part), colour, series)
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
        _x_axis(ax, all_x, log, x_label or x)
        if log:
            _log_y(ax, metric.formatter, drawn + [y for e, _ in paper for _x, y in e.points])
        else:
            ax.set_ylim(bottom=0)
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(metric.formatter))
        ax.set_ylabel(metric.label)
        ylim = ax.get_ylim()
        failed = _mark_failed(ax, rows, x, palette, names)
        ax.set_ylim(ylim)
        if failed:
            handles.append(
                Line2D([], [], ls="none", marker="x", markersize=8, mew=2, color="0.35", label="did not finish (status at top edge)")
            )
        if contended:
            handles.append(contended_handle("contended (timing disturbed by other load)"))
        legend = ax.legend(
            handles=handles,
            labels=legend_labels(handles),
            title=legend_title,
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            frameon=False,
            fontsize=9,
            title_fontsize=9,
            alignment="left",
        )
        if paper_handles:
            ax.add_artist(legend)
            ax.legend(
                handles=paper_handles,
                title=paper_title,
                loc="lower left",
                bbox_to_anchor=(1.02, 0.0),
                frameon=False,
                fontsize=9,
                title_fontsize=9,
                alignment="left",
            )
        _title(ax, title, subtitle)
        return fig


CONTENDED_STYLE = {"ls": "none", "markersize": 9, "markerfacecolor": "white", "markeredgewidth": 1.6, "zorder": 4}


def _mark_contended(ax: plt.Axes, xs: pd.Series, ys: pd.Series, mask: pd.Series, colour: Any, series: str) -> int:
    """Draw the points of contended cells as hollow circles crossed by an 'x' (gid
    `contended-<series>-<x>`) over a line's filled markers; returns how many."""
    mask = mask.to_numpy(bool)
    for x_value, y_value in zip(xs.to_numpy()[mask], ys.to_numpy()[mask]):
        gid = f"contended-{_slug(series)}-{_slug(x_value)}"
        ax.plot([x_value], [y_value], marker="o", markeredgecolor=colour, gid=gid, **CONTENDED_STYLE)
        ax.plot([x_value], [y_value], ls="none", marker="x", markersize=5, mew=1.4, color=colour, zorder=5, gid=f"{gid}-x")
    return int(mask.sum())


def contended_handle(label: str) -> tuple[Line2D, Line2D]:
    """A legend entry of the contended marker (a hollow circle crossed by an 'x')."""
    circle = Line2D([], [], marker="o", markeredgecolor="0.3", label=label, **CONTENDED_STYLE)
    cross = Line2D([], [], ls="none", marker="x", markersize=5, mew=1.4, color="0.3")
    return circle, cross


def legend_labels(handles: Sequence[Any]) -> list[str]:
    """The label of each legend handle (of its first artist, for a tuple such as `contended_handle`)."""
    return [(h[0] if isinstance(h, tuple) else h).get_label() for h in handles]


def _mark_failed(ax: plt.Axes, rows: pd.DataFrame, x: str, palette: dict[str, Any], names: dict[str, str]) -> int:
    """Draw rows whose status is not ok as 'x' on the top edge (stacked downwards when several
    share an x), with "<series>: <STATUS>" to their left. Returns how many were drawn."""
    failed = rows[rows["status"] != "ok"]
    transform = blended_transform_factory(ax.transData, ax.transAxes)
    stacked: dict[Any, int] = {}
    order = {s: i for i, s in enumerate(series_order(rows["series"]))}
    for _, row in failed.sort_values(by=x, key=lambda c: c.astype(float)).iterrows():
        n = stacked.get(row[x], 0)
        stacked[row[x]] = n + 1
        y = 1.0 - 0.07 * n
        series, status = row["series"], str(row["status"])
        colour = palette.get(series, "0.3")
        ax.plot(
            [row[x]],
            [y],
            transform=transform,
            ls="none",
            marker="x",
            markersize=9,
            mew=2.2,
            color=colour,
            clip_on=False,
            zorder=5,
            gid=f"failed-{_slug(status)}-{_slug(series)}-{_slug(row[x])}",
            label=f"_failed {series} {status}",
        )
        ax.annotate(
            f"{names.get(series, series)}: {status.upper()}",
            (row[x], y),
            xycoords=transform,
            xytext=(-8, 0),
            textcoords="offset points",
            ha="right",
            va="center",
            fontsize=8,
            color=colour,
            zorder=5,
            gid=f"failed-label-{order.get(series, 0)}-{_slug(row[x])}",
        )
    return len(failed)


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
    style, context = _theme()
    with style, context:
        fig, ax = _new_figure()
        for series in series_order(rows["series"]):
            part = rows[rows["series"] == series].sort_values("step")
            colour = palette.get(series, "0.3")
            for column, kwargs in (("train_bpd", {"ls": "-"}), ("eval_bpd", {"ls": "--", "marker": "o", "markersize": 4})):
                if column in part and part[column].notna().any():
                    points = part[part[column].notna()]
                    ax.plot(
                        points["step"],
                        points[column],
                        color=colour,
                        lw=1.6,
                        label=f"{names.get(series, series)} ({column.split('_')[0]})",
                        **kwargs,
                    )
        ax.set_xlabel("training step")
        ax.set_ylabel("bits per dim (bits/symbol)")
        ax.legend(
            loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=9, title=legend_title, title_fontsize=9, alignment="left"
        )
        _title(ax, title, subtitle)
        return fig


# The memory breakdown of a cell (MiB columns, bottom to top of a stacked bar) and their names.
MEMORY_PARTS = (
    ("param_mem_mib", "parameters"),
    ("grad_mem_mib", "gradients"),
    ("optim_mem_mib", "optimizer state"),
    ("activation_mem_mib", "activations and temporaries"),
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
    style, context = _theme()
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
    style, context = _theme()
    with style, context:
        fig, ax = _new_figure((1.2 * len(table.columns) + 3.0, 0.6 * len(table.index) + 2.0))
        sns.heatmap(table.astype(float), annot=True, fmt=".1f", cmap="crest", vmin=0, vmax=100, ax=ax, cbar_kws={"label": "accuracy (%)"})
        ax.set_xlabel("evaluated with")
        ax.set_ylabel("trained with")
        ax.tick_params(axis="y", labelrotation=0)
        _title(ax, title, subtitle)
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
    for differences beyond noise, hollow ones for `within_noise` cells, crossed hollow ones for
    `inconclusive` (contended) cells; a reference line at 1;
    cells that did not finish in either run (`status` not ok) as 'x' on the top edge."""
    names = names or {}
    style, context = _theme()
    with style, context:
        fig, ax = _new_figure()
        ax.axhline(1.0, color="0.4", lw=1, ls=":")
        handles: list[Any] = []
        inconclusive = 0
        for series in series_order(rows["series"]):
            part = rows[(rows["series"] == series) & rows["ratio"].notna()].sort_values(x)
            if part.empty:
                continue
            colour = palette.get(series, "0.3")
            (line,) = ax.plot(part[x], part["ratio"], color=colour, lw=1.4, label=names.get(series, series))
            handles.append(line)
            noise = part["within_noise"].astype(object).eq(True)
            vague = part["inconclusive"].astype(object).eq(True) if "inconclusive" in part else pd.Series(False, index=part.index)
            inconclusive += _mark_contended(ax, part[x], part["ratio"], vague, colour, series)
            beyond = ~noise & ~vague
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
        _x_axis(ax, rows[x].dropna(), is_log_axis(rows[x]), x_label or x)
        ratios = rows["ratio"].dropna()
        if not ratios.empty:
            low, high = min(ratios.min(), 1.0), max(ratios.max(), 1.0)
            if high / low > 3:  # wide spread: log scale, so 0.5x and 2x sit symmetric around 1
                ax.set_yscale("log")
                ax.set_ylim(low / 1.1, high * 1.1)
                _log_y(ax, format_plain)
            else:
                pad = max(0.05, 0.1 * (high - low))
                ax.set_ylim(low - pad, high + pad)
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(format_plain))
        ax.set_ylabel(y_label)
        ylim = ax.get_ylim()
        if _mark_failed(ax, rows, x, palette, names):
            handles.append(Line2D([], [], ls="none", marker="x", markersize=8, mew=2, color="0.35", label="did not finish in A or B"))
        ax.set_ylim(ylim)
        ax.legend(
            handles=handles,
            labels=legend_labels(handles),
            title=legend_title,
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            frameon=False,
            fontsize=9,
            title_fontsize=9,
            alignment="left",
        )
        _title(ax, title, subtitle)
        return fig


def save(fig: Figure, folder: Path, stem: str) -> list[Path]:
    """Write `fig` as <stem>.png and <stem>.svg (reproducible SVG ids, no date) and return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.png", folder / f"{stem}.svg"]
    legends = [a for ax in fig.axes for a in ax.get_children() if isinstance(a, matplotlib.legend.Legend)]
    with matplotlib.rc_context({"svg.hashsalt": "reformer-harness", "svg.fonttype": "none"}):
        fig.savefig(paths[0], dpi=DPI, bbox_inches="tight", bbox_extra_artists=legends, metadata={"Software": None})
        fig.savefig(paths[1], bbox_inches="tight", bbox_extra_artists=legends, metadata={"Date": None, "Creator": None})
    return paths
