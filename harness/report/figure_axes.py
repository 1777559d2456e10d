"""The drawing helpers every figure shares: theme, axes (log scales, tick labels), and the markers
of cells that did not finish ('x' on the top edge, gid `failed-<status>-<series>-<x>`) and of
contended cells (hollow circles crossed by an 'x', gid `contended-<series>-<x>`)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Callable

import matplotlib

from harness.store.schema import STATUS, STATUS_OK

matplotlib.use("Agg")
# Figure text comes from runs (labels, versions, settings): "$" must not start math text, where a
# label like "$\\frac{$" made the whole report fail. No figure here uses math text on purpose.
matplotlib.rcParams["text.parse_math"] = False

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from harness.report.palette import series_order  # noqa: E402

FIGSIZE = (8.5, 5.0)
DPI = 150


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


def nice_log_limits(low: float, high: float, subs: Sequence[float], reach: float = 1.4) -> tuple[float, float]:
    """Widen (low, high) to the nearest tick of a log axis with mantissas `subs` outside it when that
    tick is within a factor `reach` (so the ends carry a label), else by 8% only."""
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 2) for m in subs]
    below = max(t for t in ticks if t <= low * 1.0001)
    above = min(t for t in ticks if t >= high * 0.9999)
    return (below if low / below <= reach else low / 1.08), (above if above / high <= reach else high * 1.08)


def log_y(ax: plt.Axes, formatter: Callable[[float, Any], str], data: Sequence[float] = ()) -> None:
    """Log y axis with labelled ticks at 1-2-5 (or decades for wide ranges); with `data`, the limits
    are widened to the ticks just outside it so both ends carry a label."""
    ax.set_yscale("log")
    values = [v for v in data if v > 0 and math.isfinite(v)]
    low, high = (min(values), max(values)) if values else ax.get_ylim()
    decades = math.log10(high / low) if low > 0 else 10
    subs = (1.0, 2.0, 5.0) if decades <= 3.5 else (1.0,)
    if values:
        ax.set_ylim(*nice_log_limits(low / 1.05, high * 1.05, subs))
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(formatter))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def x_axis(ax: plt.Axes, values: Sequence[float], log: bool, label: str) -> None:
    """An x axis with a tick (1K, 32K, ...) at each of `values`; log base 2 when `log`."""
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


def slug(text: str) -> str:
    """`text` as a part of an SVG id: runs of other characters than letters, digits, '_.-' as '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


def theme() -> Any:
    """Seaborn style and context for every figure (restored afterwards)."""
    return sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85)


def new_figure(size: tuple[float, float] = FIGSIZE) -> tuple[Figure, plt.Axes]:
    """A figure of `size` inches (at DPI) with one axes."""
    fig = Figure(figsize=size, dpi=DPI)
    ax = fig.add_subplot()
    return fig, ax


def set_title(ax: plt.Axes, title: str, subtitle: str | None) -> None:
    """The title, and the subtitle on the lines below it, left-aligned above the axes."""
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11, loc="left")


CONTENDED_STYLE = {"ls": "none", "markersize": 9, "markerfacecolor": "white", "markeredgewidth": 1.6, "zorder": 4}


def mark_contended(ax: plt.Axes, xs: pd.Series, ys: pd.Series, mask: pd.Series, colour: Any, series: str) -> int:
    """Draw the points of contended cells as hollow circles crossed by an 'x' (gid
    `contended-<series>-<x>`) over a line's filled markers; returns how many."""
    mask = mask.to_numpy(bool)
    for x_value, y_value in zip(xs.to_numpy()[mask], ys.to_numpy()[mask]):
        gid = f"contended-{slug(series)}-{slug(x_value)}"
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


def mark_failed(ax: plt.Axes, rows: pd.DataFrame, x: str, palette: dict[str, Any], names: dict[str, str]) -> int:
    """Draw rows whose status is not ok as 'x' on the top edge (stacked downwards when several
    share an x), with "<series>: <STATUS>" to their left. Returns how many were drawn."""
    failed = rows[rows[STATUS] != STATUS_OK]
    transform = blended_transform_factory(ax.transData, ax.transAxes)
    stacked: dict[Any, int] = {}
    order = {s: i for i, s in enumerate(series_order(rows["series"]))}
    for _, row in failed.sort_values(by=x, key=lambda c: c.astype(float)).iterrows():
        n = stacked.get(row[x], 0)
        stacked[row[x]] = n + 1
        y = 1.0 - 0.07 * n
        series, status = row["series"], str(row[STATUS])
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
            gid=f"failed-{slug(status)}-{slug(series)}-{slug(row[x])}",
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
            gid=f"failed-label-{order.get(series, 0)}-{slug(row[x])}",
        )
    return len(failed)
