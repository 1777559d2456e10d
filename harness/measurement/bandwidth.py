"""The memory roof: `measure_bandwidth`, the streaming bandwidth of a device in GB/s, measured in the
cell's own process like the matmul rate (harness.measurement.floor): a STREAM-style triad
a = b + s c over buffers much larger than any cache, in the cell's dtype and thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from harness.measurement.floor import DTYPES
from harness.measurement.timing import TimingSettings, time_callable
from harness.store.schema import MEMBW_GBYTES_PER_S, MEMBW_MIB
from harness.units import MIB

# Bytes of the three triad buffers together, per device type: far above the last-level cache
# (CPU L3: tens of MB; H100's L2: 50 MB), and small enough for any machine that runs a cell.
BANDWIDTH_BYTES = {"cpu": 384 * MIB, "cuda": 3 * 1024 * MIB}
BANDWIDTH_REPEATS = {"cpu": 5, "cuda": 20}
BANDWIDTH_BUDGET_S = {"cpu": 1.0, "cuda": 1.0}


@dataclass
class BandwidthReading:
    """The streaming bandwidth of a triad a = b + s c over three buffers of `numel` elements each:
    3 numel x element size bytes moved (two read, one written) per call."""

    gbytes_per_s: float  # bytes moved / best repeat, in GB/s (1e9 bytes per second)
    numel: int
    element_size: int
    best_ms: float

    @property
    def mib(self) -> float:
        """The three buffers together, MiB."""
        return 3 * self.numel * self.element_size / MIB

    def as_row(self) -> dict:
        """Result-row columns: `membw_gbytes_per_s` (GB/s) and `membw_mib` (the buffers, MiB)."""
        return {MEMBW_GBYTES_PER_S: self.gbytes_per_s, MEMBW_MIB: self.mib}


def _triad(numel: int, device: torch.device, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """a = b + 0.5 c over three [numel] buffers that live in the returned closure."""
    out = torch.empty(numel, device=device, dtype=dtype)
    left = torch.ones(numel, device=device, dtype=dtype)
    right = torch.ones(numel, device=device, dtype=dtype)
    return lambda: torch.add(left, right, alpha=0.5, out=out)


def measure_bandwidth(
    device: torch.device | str,
    dtype: torch.dtype | str = torch.float32,
    total_bytes: int | None = None,
    repeats: int | None = None,
    budget_s: float | None = None,
) -> BandwidthReading:
    """Time `torch.add(b, c, alpha=0.5, out=a)` (a triad: reads b and c, writes a) on three
    buffers of `total_bytes` together (default 384 MiB on CPU, 3 GiB on CUDA) in `dtype`, with
    `time_callable` (CUDA events on GPU, perf_counter_ns on CPU) after one untimed call; the
    bandwidth is the bytes moved over the *fastest* of `repeats` calls (default 5 on CPU, 20 on
    CUDA, fewer when `budget_s` runs out), in GB/s (1e9 B/s). Runs with torch's current thread
    count, which a triad needs all of to reach the machine's bandwidth."""
    device = torch.device(device)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    kind = "cuda" if device.type == "cuda" else "cpu"
    total_bytes = BANDWIDTH_BYTES[kind] if total_bytes is None else total_bytes
    element_size = torch.empty((), dtype=dtype).element_size()
    numel = max(1, total_bytes // (3 * element_size))
    repeats = repeats or BANDWIDTH_REPEATS[kind]
    budget_s = BANDWIDTH_BUDGET_S[kind] if budget_s is None else budget_s
    settings = TimingSettings(warmup=1, min_repeats=repeats, min_time_s=0.0, max_repeats=repeats, max_time_s=max(budget_s, 1e-3))
    timing = time_callable(_triad(numel, device, dtype), device, settings)  # its buffers are freed with the closure
    best_s = timing.min_ms / 1e3
    moved = 3 * numel * element_size
    gbytes = moved / best_s / 1e9 if best_s > 0 else math.nan
    return BandwidthReading(gbytes_per_s=gbytes, numel=numel, element_size=element_size, best_ms=timing.min_ms)
