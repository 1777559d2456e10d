"""Published numbers (the Reformer paper, Long Range Arena) and a run put beside them.

Source: N. Kitaev, L. Kaiser, A. Levskaya, "Reformer: The Efficient Transformer", ICLR 2020
(arXiv:2001.04451). The Figure 5 values are read off the published log-scale plot by eye
(only the two endpoints, 1K and 32K, of each line); they are approximate, the paper does not
state its hardware, and the values are seconds per training step of one attention layer at a
constant 32,768 tokens per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from harness.analysis.series import first_value, tokens_per_step, variant_params, with_series
from harness.store.schema import (
    BATCH,
    D_FF,
    D_MODEL,
    DEVICE,
    DEVICE_NAME,
    GRAD_MEM_MIB,
    MODE,
    N_LAYERS,
    OPTIM_MEM_MIB,
    PARAM_MEM_MIB,
    PEAK_MEM_MIB,
    SEQ_LEN,
    STATUS,
    STATUS_OK,
    TIME_MS_MEDIAN,
    TRAIN_STEPS,
    VARIANT,
    VARIANT_PARAMS,
    WORKLOAD,
)

CITATION = 'Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer", ICLR 2020 (arXiv:2001.04451)'

FIG5_TOKENS_PER_STEP = 32768
"""Figure 5 (right): every point processes 32,768 tokens per step ((1024, 32) ... (32768, 1))."""


@dataclass(frozen=True)
class PaperSeries:
    """One line of a paper figure: its name there, the variant config it corresponds to, and
    `points` as (seq_len, seconds per step) pairs."""

    name: str
    variant: str
    params: dict = field(default_factory=dict)
    points: tuple[tuple[int, float], ...] = ()

    def matches(self, variant: str, params: dict) -> bool:
        """Whether a measured series (registry name + variant parameters) is this paper line."""
        return variant == self.variant and all(params.get(k) == v for k, v in self.params.items())


FIG5: tuple[PaperSeries, ...] = (
    PaperSeries("full attention", "full", {}, ((1024, 0.17), (32768, 3.5))),
    PaperSeries("LSH-1", "lsh", {"n_hashes": 1}, ((1024, 0.10), (32768, 0.07))),
    PaperSeries("LSH-2", "lsh", {"n_hashes": 2}, ((1024, 0.15), (32768, 0.13))),
    PaperSeries("LSH-4", "lsh", {"n_hashes": 4}, ((1024, 0.20), (32768, 0.23))),
    PaperSeries("LSH-8", "lsh", {"n_hashes": 8}, ((1024, 0.32), (32768, 0.44))),
)
"""Paper Fig. 5 (right), seconds per step; endpoints read off the plot, not interpolated."""

TABLE2_EVAL = ("full", "LSH-8", "LSH-4", "LSH-2", "LSH-1")
TABLE2: dict[str, tuple[float, ...]] = {
    "full": (100, 94.8, 92.5, 76.9, 52.5),
    "LSH-4": (0.8, 100, 99.9, 99.4, 91.9),
    "LSH-2": (0.8, 100, 99.9, 98.1, 86.8),
    "LSH-1": (0.8, 99.9, 99.6, 94.8, 77.9),
}
"""Paper Table 2, duplication task accuracy (%): rows trained with, columns (TABLE2_EVAL) evaluated with."""

TABLE2_SCALE = {SEQ_LEN: 1024, D_MODEL: 256, D_FF: 256, TRAIN_STEPS: 150_000}
"""The setting of Table 2 (1 layer, 4 heads, 127 symbols, bucket 64): the columns of a quality row
it is compared on."""


def table2_scale_note(rows: Any) -> str:
    """One sentence comparing a duplication run's scale with Table 2's (`rows`: its result rows, with
    the `TABLE2_SCALE` columns); it says when the run is smaller, where the paper's patterns (a
    full-attention model degrading with fewer hash rounds; LSH-trained models at chance with
    trax's full attention) need not appear; "" when the rows do not say their scale."""
    here = {k: rows[k].dropna().iloc[0] for k in TABLE2_SCALE if k in rows and rows[k].notna().any()}
    shown = ", ".join(f"{k} {int(v):,} (paper {TABLE2_SCALE[k]:,})" for k, v in here.items())
    smaller = [k for k, v in here.items() if v < TABLE2_SCALE[k]]
    if not here:
        return ""
    if not smaller:
        return f"This run is at the paper's scale: {shown}."
    return (
        f"**Smaller than the paper's setting** ({shown}): a pattern of the paper's table that is missing here "
        "may need the paper's scale, so a difference is not by itself a failure to reproduce."
    )


# --------------------------------------------------------------------------- Long Range Arena

LRA_CITATION = 'Tay et al., "Long Range Arena: A Benchmark for Efficient Transformers", ICLR 2021 (arXiv:2011.04006)'
LRA_SETUP = "byte-level text classification, batch 32, 4 layers, 4x4 TPU v3, JAX/Flax"
LRA_LENGTHS = (1024, 2048, 3072, 4096)


@dataclass(frozen=True)
class LraModel:
    """One row of LRA's efficiency table: its name there, our registry variant for the same method,
    training steps per second and peak memory per device (GB) at `LRA_LENGTHS` (None: not given)."""

    name: str
    variant: str
    steps_per_s: tuple[float | None, ...]
    memory_gb: tuple[float | None, ...]


LRA_TABLE2: tuple[LraModel, ...] = (
    LraModel("Transformer", "full", (8.1, 4.9, 2.3, 1.4), (0.85, 2.65, 5.51, 9.48)),
    LraModel("Local attention", "local", (9.2, 8.4, 7.4, 7.4), (0.42, 0.76, 1.06, 1.37)),
    LraModel("Linformer", "linformer", (9.3, 9.1, 8.5, 7.7), (0.37, 0.55, 0.99, 0.99)),
    LraModel("Reformer", "lsh", (4.4, 2.2, 1.5, 1.1), (0.48, 0.99, 1.53, 2.28)),
    LraModel("Performer", "performer", (9.5, 9.4, 8.7, 8.0), (0.37, 0.59, 0.82, 1.06)),
    LraModel("Linear Transformer", "linear", (None, None, None, 7.8), (None, None, None, 1.03)),
)
"""LRA Table 2 (efficiency), the rows whose method the registry has; the speed-ups LRA prints in
parentheses are steps/s over the Transformer's at the same length."""


def lra_relative(model: LraModel) -> tuple[dict[int, float], dict[int, float]]:
    """(speed, memory) of `model` relative to LRA's Transformer, by length: steps/s over the
    Transformer's (LRA's parenthesised speed-ups), memory over the Transformer's."""
    base = LRA_TABLE2[0]
    speed = {n: s / b for n, s, b in zip(LRA_LENGTHS, model.steps_per_s, base.steps_per_s) if s is not None}
    memory = {n: m / b for n, m, b in zip(LRA_LENGTHS, model.memory_gb, base.memory_gb) if m is not None}
    return speed, memory


# --------------------------------------------------------------------------- a run beside the papers


def paper_fig5(rows: pd.DataFrame, palette: dict[str, Any]) -> tuple[list[tuple[PaperSeries, Any]], pd.DataFrame | None, str]:
    """The paper's Fig. 5 lines to draw (with our colour of the matching series), the comparison
    table (paper vs this run at the read-off lengths, seconds per step) and a note.

    Lines are drawn only for one attention layer trained at the paper's 32,768 tokens per step; the
    table is given for any constant-tokens attention run (compare ratios when the tokens differ)."""
    tokens = tokens_per_step(rows)
    if first_value(rows, WORKLOAD) != "attention" or tokens is None or first_value(rows, MODE) == "forward":
        return [], None, ""
    frame = with_series(rows, SEQ_LEN)
    keys = frame.drop_duplicates("series")
    lines, table = [], []
    for entry in FIG5:
        match = [r["series"] for _, r in keys.iterrows() if entry.matches(str(r[VARIANT]), variant_params(r[VARIANT_PARAMS]))]
        series = match[0] if match else None
        lines.append((entry, palette.get(series, (0.5, 0.5, 0.5))))
        (x0, y0), (x1, y1) = entry.points[0], entry.points[-1]
        mine, seconds = {}, {}
        for x_value in (x0, x1):
            cell = frame[(frame["series"] == series) & (frame[SEQ_LEN] == x_value)] if series else frame.iloc[:0]
            if cell.empty:
                mine[x_value] = "-"
            elif cell[STATUS].iloc[0] != STATUS_OK:
                mine[x_value] = str(cell[STATUS].iloc[0]).upper()
            else:
                seconds[x_value] = float(cell[TIME_MS_MEDIAN].iloc[0]) / 1000
                mine[x_value] = f"{seconds[x_value]:.4g}"
        ratio = f"{seconds[x1] / seconds[x0]:.3g}" if len(seconds) == 2 else "-"
        table.append(
            {
                "paper line": entry.name,
                f"paper at {x0} (s)": y0,
                f"paper at {x1} (s)": y1,
                f"paper {x1}/{x0}": f"{y1 / y0:.3g}",
                "matched series here": series or "-",
                f"here at {x0} (s)": mine[x0],
                f"here at {x1} (s)": mine[x1],
                f"here {x1}/{x0}": ratio,
            }
        )
    note = (
        f"Endpoints read off the paper's Figure 5 (right) by eye, {FIG5_TOKENS_PER_STEP} tokens per step, "
        f"hardware not stated ({CITATION}). Only the two read-off points per line are drawn (hollow "
        "markers, dashed line); nothing between them is the paper's."
    )
    if tokens != FIG5_TOKENS_PER_STEP:
        note += (
            f" This run used {tokens} tokens per step, so the paper's lines are not drawn; compare the 32K/1K ratios, not absolute times."
        )
        lines = []
    return lines, pd.DataFrame(table), note


def lra_comparison(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, str] | None:
    """Speed and memory relative to the Transformer, LRA's Table 2 beside this run, or None unless
    `rows` are a model training run with a `full` series and another LRA family at an LRA length.

    Returns (speed, memory, words): tables with one row per LRA model present here and one column per
    length, each cell "LRA / here"; speed = the Transformer's time per step over the series' (LRA:
    steps/s over the Transformer's), memory = the series' peak over the Transformer's, the state
    (parameters, gradients, optimizer) included where the run has the breakdown, as in LRA's
    per-device peak. `words` states the largest common length in a sentence, with the scale."""
    if first_value(rows, WORKLOAD) != "model" or first_value(rows, MODE) != "train_step":
        return None
    ok = with_series(rows[rows[STATUS] == STATUS_OK], SEQ_LEN)
    lengths = [n for n in LRA_LENGTHS if n in set(ok[SEQ_LEN])]
    state = [c for c in (PARAM_MEM_MIB, GRAD_MEM_MIB, OPTIM_MEM_MIB) if c in ok]
    memory = ok[PEAK_MEM_MIB] + (ok[state].fillna(0).sum(axis=1) if state else 0)
    ok = ok.assign(memory_total=memory)
    full = ok[ok[VARIANT] == "full"].drop_duplicates(SEQ_LEN).set_index(SEQ_LEN)
    families = {m.variant for m in LRA_TABLE2[1:]}
    if full.empty or not lengths or not set(ok[VARIANT]) & families:
        return None
    speed_rows, memory_rows, said = [], [], []
    longest = max(n for n in lengths if n in full.index)
    for model in LRA_TABLE2:
        lra_speed, lra_memory = lra_relative(model)
        for series, cells in ok[ok[VARIANT] == model.variant].groupby("series", sort=False):
            cells = cells.drop_duplicates(SEQ_LEN).set_index(SEQ_LEN)
            speed, mem = {"LRA model": model.name, "series here": series}, {"LRA model": model.name, "series here": series}
            for n in lengths:
                here = n in cells.index and n in full.index
                ours_speed = full.at[n, TIME_MS_MEDIAN] / cells.at[n, TIME_MS_MEDIAN] if here else math.nan
                ours_memory = cells.at[n, "memory_total"] / full.at[n, "memory_total"] if here else math.nan
                column = f"{n // 1024}K (LRA / here)"
                speed[column] = f"{_times(lra_speed.get(n))} / {_times(ours_speed)}"
                mem[column] = f"{_times(lra_memory.get(n), 2)} / {_times(ours_memory, 2)}"
                if n == longest and model.variant != "full" and math.isfinite(ours_speed):
                    said.append(
                        f"{series} {ours_speed:.1f}x the Transformer's steps/s and {ours_memory:.2f}x its memory "
                        f"(LRA's {model.name}: {_times(lra_speed.get(n))}, {_times(lra_memory.get(n), 2)})"
                    )
            speed_rows.append(speed)
            memory_rows.append(mem)
    batch, layers = first_value(rows, BATCH), first_value(rows, N_LAYERS)
    words = (
        f"Beside LRA's efficiency table ({LRA_CITATION}; {LRA_SETUP}). Here: batch {batch}, "
        f"{layers} layers, {first_value(rows, DEVICE_NAME) or first_value(rows, DEVICE)}, so only ratios to the Transformer "
        "compare; absolute steps/s and GB do not transfer across batch, depth and hardware. LRA's ratios are "
        "recomputed from its steps/s and GB (so 1.1x where LRA prints a rounded 1.2x). "
        f"At {longest // 1024}K here: " + ("; ".join(said) if said else "no family finished") + "."
    )
    return pd.DataFrame(speed_rows).set_index("LRA model"), pd.DataFrame(memory_rows).set_index("LRA model"), words


def _times(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}x"
