"""Colours and order of series labels: one colour per series label, derived from the labels alone,
so one series has one colour in every figure of a report and of any report with the same labels."""

from __future__ import annotations

import re
from collections.abc import Iterable

import matplotlib
import numpy as np
import seaborn as sns

# Variant families first in this order (then alphabetically); only an ordering, colours are derived.
DEFAULT_ORDER = ("full", "sdpa", "lsh")
# Families with a single series: distinct fixed colours in family order (near-black first).
SINGLE_COLOURS = ("#222222", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
# Families whose series differ by numbers (n_hashes, d_ff, ...): one sequential palette each.
SEQUENTIAL = ("crest", "Oranges", "Greens", "Purples", "Blues")
# Families whose series differ by words (residual=standard/reversible): qualitative colours.
QUALITATIVE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#17becf", "#bcbd22", "#e377c2")

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
