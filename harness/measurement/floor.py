"""The compute floor's rate: `matmul_rate`, the sustained GFLOP/s of a large square matmul on a
device in a dtype, measured in the cell's own process (a cell's floor_s = flops / rate; the floor
columns are derived in harness.cells.benchmark.floor_columns). And `DTYPES`: the dtype names a
suite may use, as torch dtypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from harness.measurement.timing import TimingSettings, time_callable
from harness.store.schema import MATMUL_GFLOPS, MATMUL_N

# The matmul probe: largest square size, time budget and timed repeats per device type.
MATMUL_MAX_N = {"cpu": 2048, "cuda": 8192}
MATMUL_BUDGET_S = {"cpu": 1.5, "cuda": 2.0}
MATMUL_REPEATS = {"cpu": 3, "cuda": 10}
MATMUL_START_N = 256  # the size-finding calls start here and double


@dataclass
class MatmulReading:
    """The sustained rate of a square matmul ``[n, n] @ [n, n]`` (2 n^3 FLOPs) on one device."""

    gflops: float  # 2 n^3 / best repeat, in GFLOP/s (1e9 FLOP per second)
    n: int
    best_ms: float  # the fastest timed repeat, ms
    dtype: str

    def as_row(self) -> dict:
        """Result-row columns: `matmul_gflops` (GFLOP/s) and `matmul_n` (the square size)."""
        return {MATMUL_GFLOPS: self.gflops, MATMUL_N: self.n}


# Suite dtype names -> torch dtypes (harness.suites.benchmark's DType); a table, so no name reaches getattr.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:  # a lookup table, not getattr: the name comes from a suite
        raise ValueError(f"not a dtype the harness measures: {dtype!r}; one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def measure_matmul(
    device: torch.device | str,
    dtype: torch.dtype | str = torch.float32,
    n: int | None = None,
    repeats: int | None = None,
    warmup: int = 1,
    budget_s: float | None = None,
) -> MatmulReading:
    """Time ``torch.mm(a, b, out=c)`` on square ``[n, n]`` matrices of ``dtype`` with
    `time_callable` (CUDA events on GPU, perf_counter_ns on CPU); the rate is 2 n^3 FLOPs over
    the *fastest* of ``repeats`` timed calls, in GFLOP/s.

    ``n=None`` picks the size: starting at 256 (one untimed warm-up call there, one timed call
    per size) it doubles while ``repeats + 1`` calls of the doubled size, predicted from the
    current one (time ~ n^3), fit in ``budget_s``, up to 2048 on CPU and 8192 on CUDA. So a
    device that is slow in this dtype (bfloat16 on many CPUs: under 1 GFLOP/s) gets a smaller
    matrix instead of a run of minutes; the whole probe takes about ``budget_s`` at most (CPU
    1.5 s, CUDA 2 s). The last size-finding call is the warm-up of the timed calls. With an
    explicit ``n``, ``warmup`` untimed calls precede the timed ones. ``repeats`` defaults to 3
    on CPU and 10 on CUDA. Runs with torch's current thread count and TF32 settings
    (``torch.backends.cuda.matmul.allow_tf32``), which it leaves as they are.
    """
    device = torch.device(device)
    dtype = _dtype(dtype)
    kind = "cuda" if device.type == "cuda" else "cpu"
    repeats = repeats or MATMUL_REPEATS[kind]
    budget_s = MATMUL_BUDGET_S[kind] if budget_s is None else budget_s
    once = TimingSettings(warmup=0, min_repeats=1, min_time_s=0.0, max_repeats=1)

    def matmul(size: int) -> Callable[[], torch.Tensor]:
        """`torch.mm` of two random [size, size] matrices into a third; the operands live in the closure."""
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        c = torch.empty(size, size, device=device, dtype=dtype)
        return lambda: torch.mm(a, b, out=c)

    if n is None:
        n = min(MATMUL_START_N, MATMUL_MAX_N[kind])
        call = matmul(n)
        seconds = time_callable(call, device, replace(once, warmup=1)).min_ms / 1e3
        while n < MATMUL_MAX_N[kind] and seconds * 8 * (repeats + 1) <= budget_s:
            n *= 2
            del call  # the smaller operands are freed before the larger ones are made
            call = matmul(n)
            seconds = time_callable(call, device, once).min_ms / 1e3
        warmup = 0  # the last size-finding call warmed this size up
    else:
        if n < 1:
            raise ValueError(f"matrix size must be >= 1, got {n}")
        call = matmul(n)
    settings = TimingSettings(warmup=warmup, min_repeats=repeats, min_time_s=0.0, max_repeats=repeats, max_time_s=max(budget_s, 1e-3))
    timing = time_callable(call, device, settings)
    del call
    best_s = timing.min_ms / 1e3
    gflops = 2 * n**3 / best_s / 1e9 if best_s > 0 else math.nan
    return MatmulReading(gflops=gflops, n=n, best_ms=timing.min_ms, dtype=str(dtype).removeprefix("torch."))


def matmul_rate(device: torch.device | str, dtype: torch.dtype | str = torch.float32, **options) -> float:
    """Sustained matrix-multiply rate of ``device`` in ``dtype``, in GFLOP/s (1e9 FLOP per second,
    2 FLOPs per multiply-add): the best repeat of a large square matmul (CPU up to n=2048,
    CUDA n=8192, timed with CUDA events), measured now, in this process. ``options`` go to
    `measure_matmul` (``n``, ``repeats``, ``warmup``, ``budget_s``). It is the rate of a cell's
    compute floor: floor_s = flops / (matmul_rate * 1e9)."""
    return measure_matmul(device, dtype, **options).gflops
