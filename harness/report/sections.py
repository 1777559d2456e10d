"""The sections of a benchmark run's report: figures, summary tables, memory breakdown, contention,
round drift, compute floor, scaling fits, the papers beside the run, measurement notes.

Which sections appear follows from the rows alone (which columns vary, which were measured), never
from suite or variant names. `benchmark_sections` draws the figures into the report's folder and
returns the blocks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from harness.analysis.fits import scaling_fits
from harness.analysis.paper import lra_comparison, paper_fig5
from harness.analysis.series import first_value, is_log_axis, primary_axis, sweep_axes, tokens_per_step, with_series
from harness.analysis.tables import CONTENDED_MARK, is_contended, pivot_metric
from harness.report import figures
from harness.report.document import Block, Figure, Heading, Paragraph, Table
from harness.report.figure_axes import format_count
from harness.report.labels import AXIS_TEXT, failed_table, legend_names, subtitle, what_was_measured
from harness.report.palette import series_order
from harness.report.roofline import roofline_sections
from harness.store.schema import (
    ACTIVATION_MEM_MIB,
    CONTENDED,
    CONTENTION,
    CONTENTION_RETRIES_USED,
    CPU_SHARE,
    FLOOR_RATIO,
    MATMUL_GFLOPS,
    MATMUL_N,
    MEM_METHOD,
    MODE,
    N_LAYERS,
    N_REPEATS,
    PEAK_MEM_MIB,
    RESIDUAL,
    ROUND_DRIFT,
    ROUNDS,
    SEQ_LEN,
    STATUS,
    STATUS_OK,
    TIME_MS_MEDIAN,
    TIME_NOISY,
    TIMER,
    TOKENS_PER_S,
)


def metric_tables(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Title -> pivoted table (series x primary axis) of median time (ms, contended cells marked) and
    of peak memory (MiB)."""
    x = primary_axis(rows)
    return {
        f"median time per step (ms), by {x}": pivot_metric(rows, TIME_MS_MEDIAN, columns=x, mark_contended=True),
        f"peak memory (MiB), by {x}": pivot_metric(rows, PEAK_MEM_MIB, columns=x, fmt="{:.1f}"),
    }


def benchmark_sections(bench: pd.DataFrame, folder: Path, palette: dict[str, Any]) -> list[Block]:
    """Draw the figures of a run's benchmark rows into `folder` and return their sections."""
    blocks: list[Block] = []
    figure_blocks, paper_blocks = _figure_blocks(bench, folder, palette)
    if figure_blocks:
        blocks += [Heading(level=2, text="Figures")] + figure_blocks
    x = primary_axis(bench)
    blocks.append(Heading(level=2, text="Summary tables"))
    blocks.append(
        Paragraph(
            "Median time per step (ms) and peak memory (MiB) per cell; rows: series, columns: "
            f"{x}. Cells that did not finish show their status."
        )
    )
    for title, table in metric_tables(bench).items():
        blocks += [Heading(level=3, text=title), Table(table)]
    blocks += _memory_breakdown_blocks(bench, folder)
    blocks += _contention_blocks(bench, x)
    blocks += _drift_blocks(bench, x)
    blocks += _floor_blocks(bench, folder, palette)
    blocks += roofline_sections(bench, folder, palette)
    blocks += _fit_blocks(bench)
    blocks += paper_blocks
    if (bench[STATUS] != STATUS_OK).any():
        blocks += [Heading(level=2, text="Cells that did not finish"), Table(failed_table(bench, x))]
    notes = measurement_notes(bench)
    if notes:
        blocks.append(Paragraph("Measurement: " + "; ".join(notes) + "."))
    return blocks + _lra_blocks(bench)


def measurement_notes(bench: pd.DataFrame) -> list[str]:
    """How the cells were measured, in short phrases: memory method, timer, repeats, noisy and
    contended cells, rounds."""
    notes = []
    if MEM_METHOD in bench and bench[MEM_METHOD].notna().any():
        notes.append(
            "peak memory measured with "
            + ", ".join(f"`{m}`" for m in bench[MEM_METHOD].dropna().unique())
            + " (peak above what was allocated before the measured call)"
        )
    if TIMER in bench and bench[TIMER].notna().any():
        notes.append("timer " + ", ".join(f"`{t}`" for t in bench[TIMER].dropna().unique()))
    if N_REPEATS in bench and bench[N_REPEATS].notna().any():
        low, high = int(bench[N_REPEATS].min()), int(bench[N_REPEATS].max())
        notes.append(f"{low} timed repeats per cell" if low == high else f"{low} to {high} timed repeats per cell")
    if TIME_NOISY in bench:
        noisy = int(bench[TIME_NOISY].fillna(False).astype(bool).sum())
        notes.append(f"{noisy} cell(s) noisy (IQR > 10% of the median)")
    if CONTENDED in bench:
        notes.append(f"{int(is_contended(bench).sum())} of {int(bench[CONTENDED].notna().sum())} cell(s) contended")
    if ROUNDS in bench and pd.to_numeric(bench[ROUNDS], errors="coerce").max() > 1:
        notes.append(f"{int(pd.to_numeric(bench[ROUNDS], errors='coerce').max())} interleaved rounds per cell")
    return notes


def _figure_plan(rows: pd.DataFrame) -> list[tuple[str, figures.Metric, str]]:
    """(x, metric, file stem) for every figure the varying columns call for."""
    plan = []
    for x in sweep_axes(rows):
        metrics = [figures.TIME, figures.MEMORY, figures.THROUGHPUT] if x == SEQ_LEN else [figures.MEMORY, figures.TIME]
        names = {TIME_MS_MEDIAN: "time", PEAK_MEM_MIB: "memory", TOKENS_PER_S: TOKENS_PER_S}
        plan += [(x, m, f"{names[m.column]}_vs_{x}") for m in metrics]
    return plan


def _figure_blocks(rows: pd.DataFrame, folder: Path, palette: dict[str, Any]) -> tuple[list[Block], list[Block]]:
    """Draw the figures of the benchmark rows; return (figure blocks, paper-reference blocks)."""
    blocks: list[Block] = []
    paper_blocks: list[Block] = []
    for x, metric, stem in _figure_plan(rows):
        frame = with_series(rows, x)
        finished = frame[frame[STATUS] == STATUS_OK]
        if metric.column not in frame or pd.to_numeric(finished.get(metric.column), errors="coerce").isna().all():
            blocks.append(Paragraph(f"No `{metric.column}` of a finished cell to draw against {x} (see the tables)."))
            continue
        title_name, names = legend_names(frame)
        short, x_label = AXIS_TEXT[x]
        lines: list = []
        if metric is figures.TIME and x == SEQ_LEN:
            lines, table, note = paper_fig5(rows, palette)
            if table is not None:
                paper_blocks = [Heading(level=2, text="Paper reference (Fig. 5)"), Paragraph(note), Table(table)]
        mem_kind = "training memory" if first_value(rows, MODE) != "forward" else "memory"
        title = {
            TIME_MS_MEDIAN: f"Time per step vs {short}",
            PEAK_MEM_MIB: f"Peak {mem_kind} vs {short}",
            TOKENS_PER_S: f"Throughput vs {short}",
        }[metric.column] + f" ({what_was_measured(rows)})"
        fig = figures.plot_metric(
            frame,
            x,
            metric,
            palette,
            title=title,
            subtitle=subtitle(rows, x),
            x_label=x_label,
            legend_title=title_name,
            names=names,
            paper=lines,
            paper_title="paper, Fig. 5 (endpoints read off)",
        )
        figures.save(fig, folder, stem)
        caption = f"{title}. " + (
            "Median of the timed repeats per cell; band: their interquartile range" if metric.band else "One measurement per cell"
        )
        caption += ". 'x' on the top edge: cells that did not finish, with their status" if (frame[STATUS] != STATUS_OK).any() else ""
        caption += "; hollow markers and dashed lines: the paper's read-off endpoints" if lines else ""
        blocks.append(Figure(stem, caption + "."))
    return blocks, paper_blocks


def _floor_blocks(rows: pd.DataFrame, folder: Path, palette: dict[str, Any]) -> list[Block]:
    """ "Time over compute floor" (`floor_ratio`, series x primary axis, and its figure) when the run
    measured the matmul rate (the suite's `measure.matmul_rate`); [] otherwise."""
    if FLOOR_RATIO not in rows or pd.to_numeric(rows[FLOOR_RATIO], errors="coerce").notna().sum() == 0:
        return []
    axes = sweep_axes(rows)
    x = axes[0] if axes else SEQ_LEN
    rates = pd.to_numeric(rows.get(MATMUL_GFLOPS), errors="coerce").dropna()
    sizes = sorted({int(n) for n in pd.to_numeric(rows.get(MATMUL_N, pd.Series(dtype=float)), errors="coerce").dropna()})
    low, high = rates.min(), rates.max()
    gflops = lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.3g}"  # noqa: E731 (plain numbers, never 4e+05)
    rate = (
        f"{gflops(low)} GFLOP/s"
        if math.isclose(low, high, rel_tol=5e-3)
        else f"{gflops(low)} to {gflops(high)} GFLOP/s (median {gflops(rates.median())})"
    )
    size = f", n = {', '.join(map(str, sizes))}" if sizes else ""
    forward = first_value(rows, MODE) == "forward"
    text = (
        "Median time per step over the compute floor, `floor_ratio` = (`time_ms_median` / 1000) / `floor_s`, "
        "where `floor_s` = `flops` / (`matmul_gflops` * 1e9) is the time the cell's analytic FLOPs "
        + ("(forward only) " if forward else "(forward, plus backward counted as 2x forward, LSH hashing once) ")
        + "take at the matrix-multiply rate measured in the cell's own process right after its timing "
        f"(the fastest of a few square matmuls in the cell's dtype{size}). 1 means the step runs at the "
        'matmul rate; "within 1.5x of the compute floor" means at most 1.5. '
        f"Matmul rate measured in this run: {rate}. Cells that did not finish show their status."
    )
    blocks: list[Block] = [Heading(level=2, text="Time over compute floor"), Paragraph(text)]
    if axes:
        frame = with_series(rows, x)
        title_name, names = legend_names(frame)
        short, x_label = AXIS_TEXT[x]
        title = f"Time over compute floor vs {short} ({what_was_measured(rows)})"
        floor_subtitle = "\n".join(p for p in (subtitle(rows, x), f"floor: the FLOPs at the measured matmul rate, {rate}") if p)
        fig = figures.plot_metric(
            frame,
            x,
            figures.FLOOR,
            palette,
            title=title,
            subtitle=floor_subtitle,
            x_label=x_label,
            legend_title=title_name,
            names=names,
        )
        stem = f"floor_ratio_vs_{x}"
        figures.save(fig, folder, stem)
        caption = f"{title}. Median time per step over the compute floor of each cell (1 = the matmul rate)"
        caption += ". 'x' on the top edge: cells that did not finish, with their status" if (frame[STATUS] != STATUS_OK).any() else ""
        blocks.append(Figure(stem, caption + "."))
    blocks.append(Table(pivot_metric(rows, FLOOR_RATIO, columns=x, fmt="{:.3g}", mark_contended=True)))
    return blocks


def memory_breakdown_table(rows: pd.DataFrame, x: str) -> pd.DataFrame:
    """Per finished cell (series, `x`): the four parts of `figures.MEMORY_PARTS` and their total, MiB;
    empty when the rows have no breakdown (runs stored before it existed)."""
    columns = [column for column, _ in figures.MEMORY_PARTS]
    finished = with_series(rows, x)
    finished = finished[finished[STATUS] == STATUS_OK]
    if ACTIVATION_MEM_MIB not in finished or finished[ACTIVATION_MEM_MIB].isna().all():
        return pd.DataFrame()
    parts = finished[columns].apply(pd.to_numeric, errors="coerce").fillna(0.0)
    table = pd.concat([finished[["series", x]], parts.round(1), parts.sum(axis=1).round(1).rename("total_mib")], axis=1)
    order = series_order(table["series"])
    return table.assign(_order=table["series"].map(order.index)).sort_values(["_order", x]).drop(columns="_order")


def growth_text(table: pd.DataFrame, x: str) -> str:
    """One sentence per series: activation memory and total at the largest `x` over the smallest."""
    parts = []
    for series, part in table.groupby("series", sort=False):
        part = part.sort_values(x)
        if len(part) < 2:
            continue
        low, high = part.iloc[0], part.iloc[-1]
        ratio = high[ACTIVATION_MEM_MIB] / low[ACTIVATION_MEM_MIB] if low[ACTIVATION_MEM_MIB] > 0 else math.nan
        parts.append(
            f"{series}: activations {low[ACTIVATION_MEM_MIB]:.1f} -> {high[ACTIVATION_MEM_MIB]:.1f} MiB ({ratio:.2f}x) and "
            f"total {low['total_mib']:.1f} -> {high['total_mib']:.1f} MiB "
            f"from {x} = {format_count(low[x])} to {format_count(high[x])}"
        )
    return "; ".join(parts)


REVERSIBLE_CLAIM = (
    "The paper (section 3) claims that reversible layers store activations once for the whole stack instead of once per "
    "layer, so activation memory does not grow with depth, while a standard stack's grows with every layer; parameters, "
    "gradients and optimizer state grow with depth either way."
)


def _memory_breakdown_blocks(rows: pd.DataFrame, folder: Path) -> list[Block]:
    """The stacked memory breakdown (figure and table) against every sweep axis, with its growth in words."""
    blocks: list[Block] = []
    for x in sweep_axes(rows):
        table = memory_breakdown_table(rows, x)
        if table.empty:
            continue
        short, x_label = AXIS_TEXT[x]
        title_name, names = legend_names(with_series(rows, x))
        title = f"Memory breakdown vs {short} ({what_was_measured(rows)})"
        fig = figures.plot_memory_breakdown(table, x, title=title, subtitle=subtitle(rows, x), x_label=x_label, names=names)
        stem = f"memory_breakdown_vs_{x}"
        figures.save(fig, folder, stem)
        caption = (
            "Parameters and buffers, gradients and optimizer state (exact tensor sizes) under the step's peak above them "
            "(activations and temporaries, measured)"
        )
        blocks += [Heading(level=3, text=f"Memory breakdown by {x}"), Figure(stem, caption + ".")]
        growth = growth_text(table, x)
        if x == N_LAYERS and RESIDUAL in rows and rows[RESIDUAL].nunique() > 1:
            blocks.append(Paragraph(REVERSIBLE_CLAIM + (f" Measured: {growth}." if growth else "")))
        elif growth:
            blocks.append(Paragraph(f"Measured: {growth}."))
        blocks.append(Table(table.set_index("series")))
    return [Heading(level=2, text="Memory breakdown (MiB)")] + blocks if blocks else []


def _contention_blocks(rows: pd.DataFrame, x: str) -> list[Block]:
    """The contended cells (`contended`: their timing stayed disturbed by other load after
    re-measuring), with their CPU share and reason; [] when there are none."""
    contended = with_series(rows[is_contended(rows)], x)
    if contended.empty:
        return []
    share = contended[CPU_SHARE].map(lambda v: "" if pd.isna(v) else f"{v:.2f}") if CPU_SHARE in contended else ""
    retries = contended[CONTENTION_RETRIES_USED] if CONTENTION_RETRIES_USED in contended else ""
    table = pd.DataFrame(
        {"series": contended["series"], x: contended[x], "CPU share": share, "re-measured": retries, CONTENTION: contended[CONTENTION]}
    ).set_index("series")
    text = (
        f"`{CONTENDED_MARK}` in the tables, crossed hollow markers in the figures: {len(contended)} of "
        f"{int(rows[CONTENDED].notna().sum())} cells stayed contended after re-measuring (other load on the "
        "machine disturbed their timing: CPU share = process CPU time / (wall time x threads) below the "
        "threshold while other processes kept cores busy, or other processes / slowed clocks on the GPU). Their "
        "times are not trustworthy; `harness compare` and `harness check` treat them as inconclusive."
    )
    return [Heading(level=3, text="Contended cells"), Paragraph(text), Table(table)]


def _drift_blocks(rows: pd.DataFrame, x: str) -> list[Block]:
    """Round-to-round drift of cells measured in rounds (`measure.rounds`): `round_drift` = max / min
    of the round medians - 1, per cell; [] without rounds."""
    if ROUND_DRIFT not in rows or pd.to_numeric(rows[ROUND_DRIFT], errors="coerce").notna().sum() == 0:
        return []
    drift = pd.to_numeric(rows[ROUND_DRIFT], errors="coerce").dropna()
    rounds = int(pd.to_numeric(rows[ROUNDS], errors="coerce").max())
    text = (
        f"Each cell was measured in {rounds} rounds, interleaved (round 1 of every cell, then round 2 of every cell "
        "in a shuffled order, ...); its samples are the union and its median time is the median of its round "
        "medians. Drift = slowest round median / fastest round median - 1: how far the machine moved between "
        f"rounds. Median drift {drift.median():.1%}, largest {drift.max():.1%}."
    )
    table = pivot_metric(rows, ROUND_DRIFT, columns=x, fmt="{:.1%}", mark_contended=True)
    return [Heading(level=3, text="Round-to-round drift"), Paragraph(text), Table(table)]


def _fit_blocks(rows: pd.DataFrame) -> list[Block]:
    blocks: list[Block] = []
    tokens = tokens_per_step(rows)
    for x in sweep_axes(rows):
        fits = scaling_fits(rows, x)
        if fits.empty:
            continue
        if is_log_axis(rows[x]):
            fits = fits.rename(columns={"time": f"k time (time ~ {x}^k)", "memory": f"k memory (memory ~ {x}^k)"})
            text = f"Least-squares fit of log(metric) on log({x}) per series over the cells that finished (status ok)."
            if x == SEQ_LEN:
                if tokens:
                    fits["per-sequence time exponent (k + 1)"] = fits[f"k time (time ~ {x}^k)"] + 1
                    text += (
                        f" At constant tokens per step ({tokens:,}): batch = {tokens:,}/L, so k = 0 means a flat "
                        "cost per step (linear per sequence) and k = 1 a cost per sequence growing as L^2."
                    )
                else:
                    text += " At a constant batch, k is the exponent per sequence."
        else:
            unit = {N_LAYERS: "layer"}.get(x, x)
            fits = fits.rename(columns={"time": f"ms per {unit}", "memory": f"MiB per {unit}"})
            text = f"Least-squares line of median time and peak memory against {x} per series (ok cells): the slope."
        blocks += [Heading(level=3, text=f"Scaling with {x}"), Paragraph(text), Table(fits.set_index("series"))]
    return [Heading(level=2, text="Scaling fits")] + blocks if blocks else []


def _lra_blocks(rows: pd.DataFrame) -> list[Block]:
    """The "Beside Long Range Arena" section of `lra_comparison`, or [] when it does not apply."""
    found = lra_comparison(rows)
    if found is None:
        return []
    speed, memory, words = found
    return [
        Heading(level=2, text="Beside Long Range Arena (Table 2)"),
        Paragraph(words),
        Heading(level=3, text="Speed relative to the Transformer (its time per step over the series')"),
        Table(speed),
        Heading(level=3, text="Peak memory relative to the Transformer (state included)"),
        Table(memory),
    ]
