"""harness.cells.benchmark_rows: the compute-floor columns and a cell's row combined from its rounds."""

from __future__ import annotations

import pytest

from harness.cells.benchmark_rows import combine_rounds, floor_columns, roofline_columns


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


def test_roofline_columns_place_a_cell_under_the_roof_of_its_intensity():
    # 1e9 FLOPs moving 1e9 bytes (1 FLOP/byte) in 0.1 s under 100 GFLOP/s and 20 GB/s: the ridge is at
    # 5 FLOP/byte, so memory bound; 10 GB/s is half the memory roof, 10 GFLOP/s a tenth of the compute roof.
    row = {"flops": 1e9, "step_bytes": 1e9, "time_ms_median": 100.0, "matmul_gflops": 100.0, "membw_gbytes_per_s": 20.0}
    assert roofline_columns(row) == {
        "intensity": 1.0,
        "gbytes_per_s": pytest.approx(10.0),
        "compute_fraction": pytest.approx(0.1),
        "memory_fraction": pytest.approx(0.5),
        "roof_bound": "memory",
        "roof_fraction": pytest.approx(0.5),
    }
    dense = roofline_columns({**row, "step_bytes": 1e8})  # 10 FLOP/byte: right of the ridge
    assert dense["roof_bound"] == "compute" and dense["roof_fraction"] == pytest.approx(0.1)
    unmeasured = roofline_columns({"flops": 1e9, "step_bytes": 1e9, "time_ms_median": 100.0})
    assert (
        unmeasured["intensity"] == 1.0
        and unmeasured["roof_bound"] is None
        and unmeasured["memory_fraction"] != unmeasured["memory_fraction"]
    )
    assert roofline_columns({"flops": 1e9, "time_ms_median": 1.0}) == {}  # no bytes: a run stored before them


def test_combined_rounds_keep_the_phases():
    rounds = [
        {"round": n, "time_ms_samples": [f + b, f + b], "time_ms_median": f + b, "forward_ms_samples": [f, f], "forward_ms_median": f,
         "backward_ms_samples": [b, b], "backward_ms_median": b, "contended": False}
        for n, (f, b) in enumerate([(1.0, 2.0), (3.0, 6.0), (2.0, 4.0)], start=1)
    ]  # fmt: skip
    row = combine_rounds(rounds)
    assert row["forward_ms_median"] == 2.0 and row["backward_ms_median"] == 4.0 and row["time_ms_median"] == 6.0
    assert row["forward_ms_samples"] == [1.0, 1.0, 3.0, 3.0, 2.0, 2.0] and len(row["backward_ms_samples"]) == 6
