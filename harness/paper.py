"""Published Reformer numbers that our figures and tables are compared against.

Source: N. Kitaev, L. Kaiser, A. Levskaya, "Reformer: The Efficient Transformer", ICLR 2020
(arXiv:2001.04451). The Figure 5 values are read off the published log-scale plot by eye
(only the two endpoints, 1K and 32K, of each line); they are approximate, the paper does not
state its hardware, and the values are seconds per training step of one attention layer at a
constant 32,768 tokens per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
