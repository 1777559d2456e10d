"""harness.measurement.memory: peak-memory probes against known allocations (CPU VmHWM and the
ru_maxrss fallback, CUDA allocator), glibc's heap holes kept out, /proc reads, OOM classification."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.measurement import MemoryReading, is_oom_error, measure_peak_memory, read_proc_status_kib

CPU = torch.device("cpu")
LINUX = sys.platform.startswith("linux")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
REPO_ROOT = Path(__file__).resolve().parents[3]
MIB_256_FLOATS = 256 * 2**20 // 4  # float32 elements in 256 MiB


def _alloc_256mib() -> None:
    x = torch.ones(MIB_256_FLOATS)  # torch.ones writes every page, so all of it is resident
    del x


@pytest.mark.skipif(not LINUX, reason="VmHWM is Linux-only")
def test_cpu_peak_of_known_allocation_within_10_percent() -> None:
    reading = measure_peak_memory(_alloc_256mib, CPU)
    assert reading.method == "vmhwm_clear_refs"
    assert reading.reserved_mib is None
    assert reading.peak_mib == pytest.approx(256.0, rel=0.10)


def _alloc_16_blocks_of_8mib() -> None:
    # 8 MiB blocks sit below glibc's adaptive mmap threshold once a larger block was freed, so
    # after a warm-up they come from pages the heap already holds.
    blocks = [torch.ones(2 * 1024 * 1024) for _ in range(16)]
    del blocks


@pytest.mark.skipif(not LINUX, reason="VmHWM is Linux-only")
def test_cpu_peak_counts_memory_reused_after_warmup() -> None:
    for _ in range(3):  # warm-up: the allocator now keeps these blocks' pages resident
        _alloc_256mib()
        _alloc_16_blocks_of_8mib()
    reading = measure_peak_memory(_alloc_16_blocks_of_8mib, CPU)
    assert reading.peak_mib == pytest.approx(128.0, rel=0.10)


@pytest.mark.skipif(not LINUX, reason="VmHWM is Linux-only")
def test_cpu_peak_is_not_the_earlier_peak() -> None:
    _alloc_256mib()  # an earlier, larger peak must not leak into the next reading
    reading = measure_peak_memory(lambda: None, CPU)
    assert 0.0 <= reading.peak_mib < 16.0


@pytest.mark.skipif(not LINUX, reason="VmHWM is Linux-only")
def test_cpu_peak_after_a_fragmenting_warmup_is_the_live_peak() -> None:
    """A step whose live peak is 80 MiB by construction (64 blocks of 1 MiB, every other one freed,
    then 32 blocks of 1.5 MiB that cannot reuse the 1 MiB holes), warmed up and measured inside
    `freed_memory_returned`, reads 80 MiB. Without it the heap's resident holes count too: 112 MiB
    on this machine (64 + 48). A fresh interpreter, so no earlier test's heap is in the reading."""
    script = textwrap.dedent(
        """
        import torch
        from harness import measurement
        MIB = 2**20
        def fragmenting_step():
            blocks = [torch.ones(MIB // 4) for _ in range(64)]
            del blocks[::2]
            larger = [torch.ones(3 * MIB // 8) for _ in range(32)]
            return len(blocks) + len(larger)
        with measurement.freed_memory_returned():
            fragmenting_step()
            print(measurement.measure_peak_memory(fragmenting_step, torch.device("cpu")).peak_mib)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=120)
    assert float(out.stdout) == pytest.approx(80.0, abs=3.0)


def test_ru_maxrss_fallback() -> None:
    # ru_maxrss is the lifetime peak, and Linux carries it over from the parent through
    # fork/exec, so the allocation is sized to rise 256 MiB above whatever peak is on record.
    script = textwrap.dedent(
        """
        import math, torch
        from harness.measurement import memory
        memory._reset_vmhwm = lambda: False  # as on a kernel without clear_refs
        gap_mib = (memory._ru_maxrss_kib() - memory._current_rss_kib()) / 1024
        n_mib = math.ceil(gap_mib) + 256
        def alloc():
            x = torch.ones(n_mib * 2**20 // 4); del x
        big = memory.measure_peak_memory(alloc, torch.device("cpu"))
        small = memory.measure_peak_memory(lambda: None, torch.device("cpu"))
        print(n_mib, big.method, big.peak_mib, small.method, small.peak_mib)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=120
    ).stdout.split()
    n_mib = float(out[0])
    assert out[1] == "ru_maxrss" and float(out[2]) == pytest.approx(n_mib, rel=0.10)
    # Below the lifetime peak the fallback cannot see anything: NaN, not a fake zero.
    assert out[3] == "ru_maxrss" and math.isnan(float(out[4]))


def test_memory_reading_as_row() -> None:
    assert MemoryReading(12.5, 64.0, "cuda_max_memory_allocated").as_row() == {
        "peak_mem_mib": 12.5,
        "peak_reserved_mib": 64.0,
        "mem_method": "cuda_max_memory_allocated",
    }


@pytest.mark.skipif(not LINUX, reason="/proc is Linux-only")
def test_read_proc_status_kib() -> None:
    rss = read_proc_status_kib("VmRSS")
    assert rss > 10_000  # torch alone is tens of MiB
    assert read_proc_status_kib("VmHWM") >= rss
    with pytest.raises(KeyError):
        read_proc_status_kib("NoSuchField")


@needs_cuda
def test_cuda_peak_of_known_allocation_within_10_percent() -> None:
    dev = torch.device("cuda")
    keep = torch.ones(MIB_256_FLOATS, device=dev)  # baseline must be subtracted

    def alloc() -> None:
        x = torch.ones(MIB_256_FLOATS, device=dev)
        del x

    measure_peak_memory(alloc, dev)  # a warm-up peak must not leak into the next reading
    reading = measure_peak_memory(alloc, dev)
    assert reading.method == "cuda_max_memory_allocated"
    assert reading.peak_mib == pytest.approx(256.0, rel=0.10)
    assert reading.reserved_mib is not None and reading.reserved_mib >= 2 * 256.0 * 0.9
    assert measure_peak_memory(lambda: None, dev).peak_mib < 16.0
    del keep


@pytest.mark.parametrize(
    "exc, expected",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (MemoryError(), True),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                "not enough memory: you tried to allocate 1099511627776 bytes."
            ),
            True,
        ),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"), False),
        (ValueError("out of memory"), False),
        (KeyboardInterrupt(), False),
        (TimeoutError(), False),
    ],
)
def test_is_oom_error_classification(exc: BaseException, expected: bool) -> None:
    assert is_oom_error(exc) is expected


def test_is_oom_error_on_real_cpu_allocation_failure() -> None:
    with pytest.raises(Exception) as info:
        torch.empty(2**62, dtype=torch.uint8)  # 4 EiB: more than any address space
    assert is_oom_error(info.value)
