"""harness.measurement.bandwidth: the triad's byte count, its row, and a plausible reading."""

from __future__ import annotations

import torch

from harness.measurement import measure_bandwidth
from harness.units import MIB


def test_the_reading_is_the_bytes_of_three_buffers_over_the_best_repeat() -> None:
    reading = measure_bandwidth("cpu", "float32", total_bytes=24 * MIB, repeats=3)
    assert reading.numel == 24 * MIB // 12 and reading.element_size == 4
    assert reading.gbytes_per_s == 3 * reading.numel * 4 / (reading.best_ms / 1e3) / 1e9
    assert 0.1 < reading.gbytes_per_s < 10_000  # any machine's memory
    row = reading.as_row()
    assert row["membw_mib"] == 24.0 and row["membw_gbytes_per_s"] == reading.gbytes_per_s
    assert measure_bandwidth("cpu", torch.float64, total_bytes=3 * MIB, repeats=1).numel == MIB // 8
