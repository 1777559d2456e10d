"""harness.measurement.floor: the matmul rate against an independent timing, the probe's size
search within its budget, bad arguments."""

from __future__ import annotations

import math
import time

import pytest
import torch

from harness.measurement import matmul_rate, measure_matmul

CPU = torch.device("cpu")


def _best_perf_counter_gflops(n: int, repeats: int = 3) -> float:
    """The same square float32 matmul, timed independently of harness.measurement."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def test_matmul_rate_is_plausible_and_agrees_with_an_independent_timing() -> None:
    rate = matmul_rate(CPU, torch.float32, n=512, repeats=3)
    assert 0.1 < rate < 10_000  # GFLOP/s
    independent = _best_perf_counter_gflops(512)
    assert independent / 4 < rate < independent * 4, (rate, independent)  # generous: a shared machine


def test_matmul_probe_picks_its_size_within_the_time_budget() -> None:
    start = time.perf_counter()
    reading = measure_matmul(CPU)  # the runner's call: size found by doubling from 256 up to 2048
    elapsed = time.perf_counter() - start
    assert reading.n in (256, 512, 1024, 2048) and reading.dtype == "float32"
    assert reading.gflops == pytest.approx(2 * reading.n**3 / (reading.best_ms / 1e3) / 1e9)
    assert 0.1 < reading.gflops < 10_000
    assert elapsed < 4.0  # budget 1.5 s plus the size-finding calls, with slack for a busy machine
    assert reading.as_row() == {"matmul_gflops": reading.gflops, "matmul_n": reading.n}
    # A device too slow for the budget keeps the smallest size instead of running for minutes.
    assert measure_matmul(CPU, "float64", budget_s=0.0).n == 256


def test_matmul_probe_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="not a dtype the harness measures: 'float33'"):
        measure_matmul(CPU, "float33", n=8)
    with pytest.raises(ValueError, match="not a dtype"):  # a torch attribute that is no dtype name of ours
        measure_matmul(CPU, "__class__", n=8)
    with pytest.raises(ValueError, match="size"):
        measure_matmul(CPU, n=0)
