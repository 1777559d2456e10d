"""harness/report/figures.py `save`: text from runs reaches the PNG and SVG as text (escaped control
characters, no math text), whatever draws it: titles, legends, categorical and heat-map tick labels."""

from __future__ import annotations

from xml.etree import ElementTree

import pandas as pd

from harness.report import figures
from harness.report.figure_axes import new_figure

HOSTILE = "lsh\x1b]0;owned\x07"
MATH = "$\\frac{$"  # math text that does not parse: drawing it used to raise


def svg_texts(path) -> list[str]:
    """The text of every <text> element of an SVG written with svg.fonttype none (it parses as XML)."""
    return ["".join(node.itertext()) for node in ElementTree.parse(path).iter() if node.tag.endswith("text")]


def test_categorical_tick_labels_legends_and_titles_are_escaped(tmp_path):
    fig, ax = new_figure()
    ax.bar([HOSTILE, MATH], [1.0, 2.0], label=MATH)
    ax.legend(title=HOSTILE)
    ax.set_title(MATH + HOSTILE)
    png, svg = figures.save(fig, tmp_path, "bars")
    texts = svg_texts(svg)
    assert png.stat().st_size > 0
    assert "lsh\\x1b]0;owned\\x07" in texts and MATH in texts  # the tick labels, shown as written
    assert not any(ch in "".join(texts) for ch in "\x1b\x07")


def test_heat_map_tick_labels_are_escaped(tmp_path):
    table = pd.DataFrame([[90.0, 10.0], [20.0, 80.0]], index=[HOSTILE, "full"], columns=[HOSTILE, MATH])
    _, svg = figures.save(figures.plot_accuracy_grid(table, title="accuracy"), tmp_path, "grid")
    texts = svg_texts(svg)
    assert texts.count("lsh\\x1b]0;owned\\x07") == 2 and MATH in texts
    assert not any(ch in "".join(texts) for ch in "\x1b\x07")
