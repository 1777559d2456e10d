"""harness.report.palette: colours derived from series labels alone."""

from __future__ import annotations

import numpy as np

from harness.report.palette import series_order, series_palette


def test_palette_is_derived_from_labels_and_stable():
    labels = ["lsh n_hashes=8", "full", "lsh n_hashes=1", "sdpa", "lsh n_hashes=2", "lsh n_hashes=4"]
    palette = series_palette(labels)
    assert palette == series_palette(list(reversed(labels)))
    assert len(set(palette.values())) == len(labels)
    assert series_order(labels) == ["full", "sdpa", "lsh n_hashes=1", "lsh n_hashes=2", "lsh n_hashes=4", "lsh n_hashes=8"]

    def luminance(colour):
        return float(np.dot(colour, [0.299, 0.587, 0.114]))

    shades = [luminance(palette[f"lsh n_hashes={n}"]) for n in (1, 2, 4, 8)]
    assert shades == sorted(shades, reverse=True)  # sequential: more hashes, darker
    words = series_palette(["lsh residual=standard", "lsh residual=reversible"])
    assert len(set(words.values())) == 2
