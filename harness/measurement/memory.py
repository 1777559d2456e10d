"""Peak memory of one call above the memory held just before it, in MiB (`measure_peak_memory`):
the CUDA caching allocator's peak on GPU; on CPU ``VmHWM`` (reset through ``/proc/self/clear_refs``)
over ``VmRSS`` before, with glibc made to return freed blocks (`freed_memory_returned`,
`release_free_heap`) so that re-used heap pages are counted; ``ru_maxrss`` as the fallback.
And `is_oom_error`: whether a failure was an out-of-memory one (the cell's row says `oom`).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import resource
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from harness.store.schema import MEM_METHOD, PEAK_MEM_MIB, PEAK_RESERVED_MIB
from harness.units import MIB

_OOM_MESSAGES = (
    "can't allocate memory",
    "defaultcpuallocator",
    "out of memory",
    "cublas_status_alloc_failed",
)


@dataclass
class MemoryReading:
    """Peak memory of one call above the baseline just before it, in MiB."""

    peak_mib: float
    reserved_mib: float | None
    method: str  # "cuda_max_memory_allocated" | "vmhwm_clear_refs" | "ru_maxrss"

    def as_row(self) -> dict:
        """Result-row columns: the peak and reserved peak (MiB) and how the peak was read."""
        return {
            PEAK_MEM_MIB: self.peak_mib,
            PEAK_RESERVED_MIB: self.reserved_mib,
            MEM_METHOD: self.method,
        }


def read_proc_status_kib(field_name: str) -> int:
    """Value of a ``kB`` field of /proc/self/status (e.g. "VmRSS", "VmHWM") in KiB.

    Raises OSError off Linux and KeyError when the field is missing.
    """
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == field_name:
                return int(value.split()[0])
    raise KeyError(field_name)


def _reset_vmhwm() -> bool:
    """Reset VmHWM to the current RSS; False when the kernel does not support it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        # Some kernels/sandboxes accept the write but ignore it: check the reset took.
        slack_kib = 4 * 1024
        return read_proc_status_kib("VmHWM") <= read_proc_status_kib("VmRSS") + slack_kib
    except (OSError, KeyError, ValueError):
        return False


def _ru_maxrss_kib() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


def _current_rss_kib() -> int:
    try:
        return read_proc_status_kib("VmRSS")
    except (OSError, KeyError):
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss // 1024


def measure_peak_memory(fn: Callable[[], object], device: torch.device) -> MemoryReading:
    """Run ``fn()`` once and return its peak memory above the pre-call baseline (MiB).

    CUDA: caching-allocator peak (``max_memory_allocated`` minus ``memory_allocated``
    before the call; tensors only, no CUDA context), plus ``max_memory_reserved``
    (everything the allocator held, absolute, not baseline-subtracted).
    CPU on Linux: ``VmHWM`` after the call minus ``VmRSS`` before it, with VmHWM reset
    through ``/proc/self/clear_refs``; includes every resident page of the process
    (allocator caches, thread stacks, libraries loaded lazily by the call).
    Fallback: ``ru_maxrss`` is the *lifetime* peak (on Linux even carried over from the
    parent through fork/exec), so it sees the call's peak only when that peak exceeds
    everything on record; then the result is ``ru_maxrss`` after minus RSS before.
    Otherwise the peak is unobservable and ``peak_mib`` is NaN rather than a fake 0.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        return _peak_cuda(fn, device)
    return _peak_cpu(fn)


def _peak_cuda(fn: Callable[[], object], device: torch.device) -> MemoryReading:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    reserved = torch.cuda.max_memory_reserved(device)
    del out
    return MemoryReading(peak / MIB, reserved / MIB, "cuda_max_memory_allocated")


GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc's malloc.h
MEASURED_MMAP_THRESHOLD = 64 * 1024  # bytes; during a CPU memory measurement, blocks this large are mmapped
WARM_MMAP_THRESHOLD = 32 * MIB  # where glibc's dynamic threshold ends after a warm-up (its 64-bit maximum)


@contextmanager
def freed_memory_returned() -> Iterator[None]:
    """While inside, glibc serves every block of `MEASURED_MMAP_THRESHOLD` bytes or more by mmap and
    returns it to the OS when it is freed, so the resident set follows the live allocations and
    VmHWM reads a call's true peak. Enter it before the warm-up of a CPU memory measurement: a
    warm-up under glibc's adaptive threshold (it rises to 32 MiB) leaves a fragmented heap whose
    freed holes the measured call touches again, and a reversible stack then read 227 -> 467 MiB from
    1 to 12 layers while its live tensors stayed at 128 MiB (docs/performance.md); with the
    thresholds set before the warm-up, VmHWM read 128.3 -> 128.6 MiB, the profiler's live peak.
    On exit the thresholds are fixed where glibc's adaptive ones end after a warm-up (mmap 32 MiB,
    trim 64 MiB), so timing that follows (after its own warm-up) sees the allocator it would have
    seen. Not glibc: does nothing."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(GLIBC_M_MMAP_THRESHOLD, MEASURED_MMAP_THRESHOLD)
    mallopt(GLIBC_M_TRIM_THRESHOLD, 2 * MEASURED_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(GLIBC_M_MMAP_THRESHOLD, WARM_MMAP_THRESHOLD)
        mallopt(GLIBC_M_TRIM_THRESHOLD, 2 * WARM_MMAP_THRESHOLD)


def release_free_heap() -> None:
    """Return glibc's free heap pages to the OS (malloc_trim), so re-used memory shows up in RSS.

    After a warm-up call, glibc keeps the freed blocks (its mmap threshold adapts upwards to 32 MiB),
    and the measured call re-uses those already-resident pages: RSS would not rise and the CPU peak
    would read far too low (measured: 64 MiB instead of 311 MiB for one LSH layer at 8K tokens).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _peak_cpu(fn: Callable[[], object]) -> MemoryReading:
    release_free_heap()
    if sys.platform.startswith("linux") and _reset_vmhwm():
        baseline = read_proc_status_kib("VmRSS")
        out = fn()
        peak = read_proc_status_kib("VmHWM") - baseline
        del out
        return MemoryReading(max(peak, 0) / 1024, None, "vmhwm_clear_refs")

    lifetime_before = _ru_maxrss_kib()
    baseline = _current_rss_kib()
    out = fn()
    lifetime_after = _ru_maxrss_kib()
    del out
    if lifetime_after > lifetime_before:
        # The call set a new lifetime peak, so lifetime_after *is* its peak.
        return MemoryReading(max(lifetime_after - baseline, 0) / 1024, None, "ru_maxrss")
    return MemoryReading(math.nan, None, "ru_maxrss")


def is_oom_error(exc: BaseException) -> bool:
    """True when ``exc`` is an out-of-memory failure (CUDA, Python or CPU allocator)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom_type is not None and isinstance(exc, oom_type)):
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc).lower()
        return any(m in message for m in _OOM_MESSAGES)
    return False
