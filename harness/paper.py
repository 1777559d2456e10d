"""Published Reformer numbers that our figures and tables are compared against.

Source: N. Kitaev, L. Kaiser, A. Levskaya, "Reformer: The Efficient Transformer", ICLR 2020
(arXiv:2001.04451). The Figure 5 values are read off the published log-scale plot by eye
(only the two endpoints, 1K and 32K, of each line); they are approximate, the paper does not
state its hardware, and the values are seconds per training step of one attention layer at a
constant 32,768 tokens per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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

TABLE2_SCALE = {"seq_len": 1024, "d_model": 256, "d_ff": 256, "train_steps": 150_000}
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
