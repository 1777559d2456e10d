"""harness.cells.benchmark: a benchmark cell's memory budget, its measurement in this process and its compute floor."""

from __future__ import annotations

import pandas as pd
import psutil
import pytest

from harness.cells import benchmark
from harness.suites import load_suite
from tests.harness.test_runner import write_suite


def test_default_memory_limit_is_a_safe_fraction_of_ram(tmp_path):
    cell = load_suite(write_suite(tmp_path, "limit", [{"name": "full"}], [64])).cells()[0]
    memory = psutil.virtual_memory()
    assert 0 < cell.memory_limit_bytes() <= 0.75 * memory.total
    limited = load_suite(write_suite(tmp_path, "limit", [{"name": "full"}], [64], memory_limit_gib=0.5)).cells()[0]
    assert limited.memory_limit_bytes() == 2**29


def test_without_matmul_rate_no_floor_columns_and_a_failed_probe_keeps_the_cell(tmp_path, monkeypatch):
    plain = load_suite(write_suite(tmp_path, "plain", [{"name": "full"}], [64])).cells()[0]
    row = benchmark.measure_cell(plain, limit_memory=False)
    assert row["status"] == "ok" and not {"matmul_gflops", "floor_s", "floor_ratio"} & set(row)

    def broken(*args, **kwargs):
        raise RuntimeError("no matmul today")

    monkeypatch.setattr(benchmark.measurement, "measure_matmul", broken)
    probed = load_suite(write_suite(tmp_path, "probed", [{"name": "full"}], [64], matmul_rate=True)).cells()[0]
    row = benchmark.measure_cell(probed, limit_memory=False)
    assert row["status"] == "ok" and row["time_ms_median"] > 0
    assert "matmul_rate probe failed: RuntimeError: no matmul today" in row["message"]
    assert all(pd.isna(row[c]) for c in ("matmul_gflops", "floor_s", "floor_ratio"))


def test_progress_line_says_contended(tmp_path):
    cell = load_suite(write_suite(tmp_path, "p", [{"name": "full"}], [64])).cells()[0]
    row = {"time_ms_median": 10.0, "time_ms_iqr": 0.5, "peak_mem_mib": 3.0}
    assert "CONTENDED" not in cell.progress_text({**row, "contended": False, "cpu_share": 0.97})
    assert cell.progress_text({**row, "contended": True, "cpu_share": 0.51, "contention_retries_used": 2}).endswith(
        "CONTENDED 0.51 after 2 re-measurements"
    )
    gpu = {**row, "contended": True, "contention": "1 other compute process on the GPU", "contention_retries_used": 0}
    assert cell.progress_text(gpu).endswith("CONTENDED (1 other compute process on the GPU)")


def test_a_cell_row_has_its_phases_bytes_and_both_roofs(tmp_path):
    suite = write_suite(tmp_path, "roofs", [{"name": "full"}], [64], mode="forward_backward", matmul_rate=True)
    row = benchmark.measure_cell(load_suite(suite).cells()[0], limit_memory=False)
    assert row["status"] == "ok" and row["message"] == ""
    for forward, backward, total in zip(row["forward_ms_samples"], row["backward_ms_samples"], row["time_ms_samples"]):
        assert forward + backward == pytest.approx(total, rel=1e-9)
    assert row["forward_flops"] + row["backward_flops"] == row["flops"] and row["backward_flops"] == 2 * row["forward_flops"]
    assert row["forward_bytes"] + row["backward_bytes"] == row["step_bytes"] > 0
    assert row["membw_gbytes_per_s"] > 0 and row["matmul_gflops"] > 0 and row["roof_bound"] in ("compute", "memory")
    assert row["intensity"] == pytest.approx(row["flops"] / row["step_bytes"])
    off = write_suite(tmp_path, "no_bandwidth", [{"name": "full"}], [64], matmul_rate=True, bandwidth=False)
    row = benchmark.measure_cell(load_suite(off).cells()[0], limit_memory=False)
    assert "membw_gbytes_per_s" not in row and row["roof_bound"] is None and row["intensity"] > 0
