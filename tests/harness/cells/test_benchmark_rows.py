"""harness.cells.benchmark_rows: the compute-floor columns and a cell's row combined from its rounds."""

from __future__ import annotations

import pytest

from harness.cells.benchmark_rows import combine_rounds, floor_columns


def test_floor_columns_are_the_flops_at_the_matmul_rate_and_the_median_over_them():
    # 2e9 FLOPs at 100 GFLOP/s: 0.02 s; a 30 ms median is 1.5x that floor
    assert floor_columns({"flops": 2e9, "time_ms_median": 30.0, "matmul_gflops": 100.0}) == {
        "floor_s": pytest.approx(0.02),
        "floor_ratio": pytest.approx(1.5),
    }
    assert floor_columns({"flops": 2e9, "time_ms_median": 30.0}) == {}
    missing = floor_columns({"flops": None, "time_ms_median": 30.0, "matmul_gflops": 100.0})
    assert missing["floor_s"] != missing["floor_s"]  # NaN where an input is missing


def test_combined_rounds_recompute_the_rates_from_the_median_over_rounds():
    def one(n: int, median: float, **extra) -> dict:
        return {
            "round": n,
            "row_type": "round",
            "cell_key": f"k-r{n}",
            "time_ms_samples": [median, median],
            "time_ms_median": median,
            "flops": 2e9,
            "tokens_per_s": 1000 / (median / 1e3),  # 1000 tokens per step
            "matmul_gflops": 100.0 * n,
            "peak_mem_mib": 10.0 * n,
            "contended": False,
            "contention": "",
            **extra,
        }

    row = combine_rounds([one(1, 10.0, started_at="t1"), one(2, 30.0, message="probe failed"), one(3, 20.0)])
    assert row["time_ms_median"] == 20.0 and row["round_medians_ms"] == [10.0, 30.0, 20.0] and row["round_drift"] == 2.0
    assert row["tokens_per_s"] == pytest.approx(1000 / 0.02) and row["tflops_per_s"] == pytest.approx(2e9 / 0.02 / 1e12)
    assert row["matmul_gflops"] == 200.0 and row["peak_mem_mib"] == 20.0 and row["floor_ratio"] == pytest.approx(0.02 / (2e9 / 200e9))
    assert row["started_at"] == "t1" and row["message"] == "probe failed" and "row_type" not in row and "round" not in row
    assert row["contended"] is False and row["contention"] == "" and row["n_repeats"] == 6
