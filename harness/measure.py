"""Timers, peak-memory probes and small measurement helpers.

Everything here follows docs/architecture.md and the measurement notes in
shared/reference/measurement.md: CUDA work is timed with per-repeat CUDA events,
CPU work with ``time.perf_counter_ns``; peak memory comes from the CUDA caching
allocator on GPU and from ``VmHWM`` (reset through ``/proc/self/clear_refs``) on CPU.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

MIB = 1024 * 1024
NOISE_THRESHOLD = 0.10  # IQR / median above which a timing is flagged, as torch.utils.benchmark does
L2_FLUSH_BYTES = 256 * MIB  # larger than any current GPU's L2 (H100: 50 MB), as triton's do_bench

_OOM_MESSAGES = (
    "can't allocate memory",
    "defaultcpuallocator",
    "out of memory",
    "cublas_status_alloc_failed",
)


# --------------------------------------------------------------------------- timing


@dataclass
class TimingSettings:
    """How many times to call a function, and for how long.

    Repeats continue until both ``min_repeats`` calls and ``min_time_s`` seconds of
    repeating are reached. ``max_repeats`` and ``max_time_s`` are hard caps that win over
    the minimums, except that at least one repeat is always taken.
    """

    warmup: int = 2
    min_repeats: int = 5
    min_time_s: float = 1.0
    max_repeats: int = 200
    max_time_s: float = 120.0
    flush_l2: bool = False  # CUDA only: overwrite a 256 MB buffer before each repeat, untimed


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of already sorted values."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def median_of(values: Sequence[float]) -> float:
    """Median of the finite `values` (NaN when there are none)."""
    return _quantile(sorted(v for v in values if math.isfinite(v)), 0.5)


@dataclass
class Timing:
    """Per-repeat wall times in milliseconds and their summary statistics."""

    samples_ms: list[float]
    timer: str = "perf_counter_ns"  # "cuda_event" | "perf_counter_ns"
    # CPU only: process CPU time of each repeat (time.process_time_ns), which other processes on a
    # shared machine do not inflate the way they inflate wall time; the regression check's CPU ratios use it.
    cpu_samples_ms: list[float] | None = None
    # CPU only: the threads the call may use (torch threads, at most the cores this process may run
    # on): the divisor of each repeat's CPU share.
    threads: int | None = None
    _sorted: list[float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.samples_ms = [float(s) for s in self.samples_ms]
        self._sorted = sorted(self.samples_ms)

    @property
    def n_repeats(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return _quantile(self._sorted, 0.5)

    @property
    def iqr_ms(self) -> float:
        """p75 - p25 in ms (0 for a single sample)."""
        return _quantile(self._sorted, 0.75) - _quantile(self._sorted, 0.25)

    @property
    def min_ms(self) -> float:
        return self._sorted[0] if self._sorted else math.nan

    @property
    def max_ms(self) -> float:
        return self._sorted[-1] if self._sorted else math.nan

    @property
    def mean_ms(self) -> float:
        return sum(self.samples_ms) / len(self.samples_ms) if self.samples_ms else math.nan

    @property
    def cpu_shares(self) -> list[float]:
        """CPU share of each repeat: process CPU time / (wall time x threads); [] without CPU times.
        About 0.95-1.0 for a compute-bound call on a quiet machine, ~0.5 beside one other busy
        process per core."""
        if self.cpu_samples_ms is None or not self.threads:
            return []
        return [cpu / (wall * self.threads) if wall > 0 else math.nan for cpu, wall in zip(self.cpu_samples_ms, self.samples_ms)]

    @property
    def noisy(self) -> bool:
        """True when IQR / median > 0.10."""
        if not self.samples_ms:
            return False
        median = self.median_ms
        if median <= 0.0:
            return self.iqr_ms > 0.0
        return self.iqr_ms / median > NOISE_THRESHOLD

    def as_row(self) -> dict:
        """Result-row columns (times in ms)."""
        return {
            "time_ms_median": self.median_ms,
            "time_ms_iqr": self.iqr_ms,
            "time_ms_min": self.min_ms,
            "time_ms_max": self.max_ms,
            "time_ms_mean": self.mean_ms,
            "time_ms_samples": list(self.samples_ms),
            "n_repeats": self.n_repeats,
            "time_noisy": self.noisy,
            "timer": self.timer,
            **(
                {}
                if self.cpu_samples_ms is None
                else {
                    "cpu_time_ms_samples": [float(s) for s in self.cpu_samples_ms],
                    "cpu_time_ms_median": _quantile(sorted(self.cpu_samples_ms), 0.5),
                }
            ),
            **({"cpu_share_samples": self.cpu_shares, "cpu_share": median_of(self.cpu_shares)} if self.cpu_shares else {}),
        }


def _done(n: int, elapsed_s: float, s: TimingSettings) -> bool:
    if n < 1:
        return False
    if n >= s.max_repeats or elapsed_s >= s.max_time_s:
        return True
    return n >= s.min_repeats and elapsed_s >= s.min_time_s


def time_callable(fn: Callable[[], object], device: torch.device, settings: TimingSettings | None = None) -> Timing:
    """Time ``fn()`` repeatedly on ``device``; returns per-call times in ms.

    ``settings.warmup`` untimed calls come first. On CUDA each repeat is bracketed by a
    pair of CUDA events on the current stream and followed by a synchronize (so the
    sample is GPU time from the start event to the end event, including launch gaps the
    GPU sees). With ``flush_l2`` a 256 MB buffer is zeroed before the start event. On CPU
    each call is bracketed by ``time.perf_counter_ns``. The min/max time limits count
    wall-clock time spent in the repeat loop (including flushes and synchronizes).
    """
    settings = settings or TimingSettings()
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(fn, device, settings)
    return _time_cpu(fn, settings)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _time_cpu(fn: Callable[[], object], settings: TimingSettings) -> Timing:
    threads = max(1, min(torch.get_num_threads(), usable_cores()))
    for _ in range(settings.warmup):
        fn()
    samples: list[float] = []
    cpu_samples: list[float] = []
    start = time.perf_counter()
    while not _done(len(samples), time.perf_counter() - start, settings):
        c0 = time.process_time_ns()
        t0 = time.perf_counter_ns()
        out = fn()
        t1 = time.perf_counter_ns()
        c1 = time.process_time_ns()
        del out  # free the result outside the timed region
        samples.append((t1 - t0) / 1e6)
        cpu_samples.append((c1 - c0) / 1e6)
    return Timing(samples, timer="perf_counter_ns", cpu_samples_ms=cpu_samples, threads=threads)


def _time_cuda(fn: Callable[[], object], device: torch.device, settings: TimingSettings) -> Timing:
    with torch.cuda.device(device):
        for _ in range(settings.warmup):
            fn()
        torch.cuda.synchronize()
        flush_buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if settings.flush_l2 else None
        samples: list[float] = []
        start_wall = time.perf_counter()
        while not _done(len(samples), time.perf_counter() - start_wall, settings):
            if flush_buf is not None:
                flush_buf.zero_()  # enqueued before the start event, so not timed
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            del out
            samples.append(begin.elapsed_time(end))
        if flush_buf is not None:
            # Hand the flush buffer back so it does not inflate a later reserved-memory reading.
            del flush_buf
            torch.cuda.empty_cache()
    return Timing(samples, timer="cuda_event")


# --------------------------------------------------------------------------- contention

# NVML clock-event reasons that mean something slowed the GPU beyond its own power draw (the software
# power cap, 0x4, is what every busy GPU reaches, so it is not one): bit -> name.
GPU_SLOWDOWN_REASONS = {0x8: "HW slowdown", 0x20: "SW thermal slowdown", 0x40: "HW thermal slowdown", 0x80: "HW power brake"}


@dataclass(frozen=True)
class ContentionSettings:
    """The contention rule's thresholds (a suite's `measure.contention_*` keys; docs/architecture.md).

    A CPU cell is contended when the other processes of the machine (not the run's own cell
    processes) kept at least `other_cores` cores busy over its timing and either its median CPU share
    was below `cpu_share` (it waited for a core) or they kept at least `spare_busy` of the cores it
    does not use busy (shared caches, memory bandwidth and, on a VM, the host's hyperthread siblings
    slow a cell whose CPU share stays full). A cell that leaves the CPU idle by itself on a quiet
    machine (sleeps, the serial parts of a multi-threaded step) is not contended. A CUDA cell is
    contended when other processes used the GPU (SM utilisation of at least `gpu_other_util_pct`
    percent, or present at all where NVML cannot tell their utilisation) or NVML reports a thermal /
    hardware slowdown after its timing. A contended cell is timed again after `backoff_s` seconds,
    at most `retries` times.
    """

    cpu_share: float = 0.85
    other_cores: float = 0.25
    spare_busy: float = 0.5
    gpu_other_util_pct: float = 5.0
    retries: int = 2
    backoff_s: float = 1.0

    @classmethod
    def from_measure(cls, measure: Mapping[str, Any]) -> ContentionSettings:
        """From a cell's `measure` settings (`contention_cpu_share`, ...); missing keys: the defaults."""
        names = ("cpu_share", "other_cores", "spare_busy", "gpu_other_util_pct", "retries", "backoff_s")
        return cls(**{name: measure[f"contention_{name}"] for name in names if measure.get(f"contention_{name}") is not None})


@dataclass(frozen=True)
class MachineSnapshot:
    """What the machine's CPUs had done at one moment, to be differenced over a timed window."""

    wall_s: float  # time.monotonic()
    busy_s: float  # CPU seconds of all cores, everything but idle and iowait (steal included), since boot
    own_s: float  # this process's CPU seconds (every thread)
    processes: dict[int, tuple[str, float]]  # other pid -> (name, CPU seconds); {} when not taken
    family_s: float = 0.0  # CPU seconds of the run's own processes (the parent, its other children, those reaped)
    family: frozenset[int] = frozenset()  # their pids


@dataclass(frozen=True)
class MachineLoad:
    """Other processes' use of the machine over a window: `other_cores` (CPU seconds of every other
    process, the kernel and the hypervisor's steal, per second of wall time; the run's own
    processes not included), `family_cores` (those of the run's own processes: the sweep and its
    other cells, e.g. the pool executor's), the busiest other processes (name, cores) and the
    1-minute load average at its end."""

    other_cores: float
    busy_processes: list[tuple[str, float]]
    load_avg_1m: float | None
    family_cores: float = 0.0

    def as_row(self) -> dict[str, Any]:
        """`other_cpu_cores`, `run_cpu_cores` (cores), `other_busy_processes` ("name cores, ..."), `load_avg_1m`."""
        return {
            "other_cpu_cores": self.other_cores,
            "run_cpu_cores": self.family_cores,
            "other_busy_processes": ", ".join(f"{name} {cores:.2f}" for name, cores in self.busy_processes),
            "load_avg_1m": self.load_avg_1m,
        }


BUSY_PROCESS_CORES = 0.25  # a process that used at least this many cores over a window counts as busy


def machine_snapshot(processes: bool = True, family_of: int | None = None) -> MachineSnapshot:
    """`MachineSnapshot` now: psutil.cpu_times() (one read of /proc/stat) and, with `processes`,
    every other process's CPU time (one pass over the process table, a few ms: take it around a
    timing loop, never per repeat). With `family_of` (the pid of the sweep that started this cell
    process) the CPU time of that process, of its children waited for (psutil's children_* times:
    cells that ended) and of its other live descendants: the run's own load, which is not
    contention. Zeros where psutil cannot tell."""
    import psutil

    try:
        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        guests = getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)  # already counted in user / nice
        busy = sum(t) - idle - guests
    except Exception:
        busy = 0.0
    me = os.getpid()
    table: dict[int, tuple[str, float]] = {}
    if processes:
        for proc in psutil.process_iter(["name", "cpu_times"]):
            info = proc.info
            if proc.pid != me and info.get("cpu_times") is not None:
                table[proc.pid] = (str(info.get("name") or proc.pid), info["cpu_times"].user + info["cpu_times"].system)
    family_s, family = 0.0, set()
    if family_of:
        try:
            parent = psutil.Process(family_of)
            t = parent.cpu_times()
            family_s, family = t.user + t.system + t.children_user + t.children_system, {parent.pid}
            for child in parent.children(recursive=True):
                if child.pid != me:
                    family.add(child.pid)
                    family_s += table[child.pid][1] if child.pid in table else sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return MachineSnapshot(time.monotonic(), busy, time.process_time(), table, family_s, frozenset(family))


def machine_load(before: MachineSnapshot, after: MachineSnapshot) -> MachineLoad:
    """Other processes' load between two snapshots (see `MachineLoad`); a process that started
    within the window counts from zero."""
    wall = after.wall_s - before.wall_s
    if wall <= 0:
        return MachineLoad(math.nan, [], _load_average())
    family = max(0.0, after.family_s - before.family_s) / wall if after.family else 0.0
    other = max(0.0, (after.busy_s - before.busy_s) - (after.own_s - before.own_s)) / wall - family
    busy = []
    for pid, (name, cpu) in after.processes.items():
        cores = (cpu - before.processes.get(pid, (name, 0.0))[1]) / wall
        if cores >= BUSY_PROCESS_CORES and pid not in after.family:
            busy.append((name, cores))
    busy.sort(key=lambda entry: -entry[1])
    return MachineLoad(max(0.0, other), busy, _load_average(), family)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def contention_verdict(
    cpu_shares: Sequence[float],
    other_cores: float,
    load_avg: float | None,
    busy_processes: Sequence[tuple[str, float]],
    settings: ContentionSettings,
    threads: int = 1,
    cores: int = 1,
) -> tuple[bool, str]:
    """(contended, reason) of a CPU timing: the rule of `ContentionSettings`, on the per-repeat CPU
    shares (process CPU time / (wall time x threads)), the machine's other load over the window
    (`other_cores`, cores), the cell's `threads` and the machine's `cores`. The reason reads e.g.
    "CPU share 0.51 < 0.85; other processes 1.4 cores busy (2 busy processes: python 0.98, find
    0.40); load average 2.6", or "other processes kept 1.0 of the 1 cores this cell does not use
    busy (>= 0.5); ..." when the share stayed full; "" when not contended."""
    if not math.isfinite(other_cores) or other_cores < settings.other_cores:
        return False, ""  # a quiet machine: a low share is the cell's own idling
    share = median_of(cpu_shares)
    if not math.isfinite(share):
        return False, ""  # no CPU times (CUDA, or a stand-in timer)
    spare = cores - threads
    if share < settings.cpu_share:
        reason = f"CPU share {share:.2f} < {settings.cpu_share:g}; other processes {other_cores:.1f} cores busy"
    elif spare > 0 and other_cores >= settings.spare_busy * spare:
        reason = (
            f"other processes kept {other_cores:.1f} of the {spare} core{'s' if spare > 1 else ''} this cell does not use busy "
            f"(>= {settings.spare_busy:g}; CPU share {share:.2f})"
        )
    else:
        return False, ""
    if busy_processes:
        listed = ", ".join(f"{name} {cores_used:.2f}" for name, cores_used in busy_processes[:3])
        reason += f" ({len(busy_processes)} busy process{'es' if len(busy_processes) > 1 else ''}: {listed})"
    if load_avg is not None:
        reason += f"; load average {load_avg:.1f}"
    return True, reason


def gpu_contention_verdict(before: Mapping[str, Any], after: Mapping[str, Any], settings: ContentionSettings) -> tuple[bool, str]:
    """(contended, reason) of a CUDA timing from two `gpu_load_snapshot`s (before and after it):
    other processes on the GPU (busy, or of unknown utilisation) or a slowdown clock-event reason."""
    reasons = []
    others = max(int(before.get("gpu_other_processes") or 0), int(after.get("gpu_other_processes") or 0))
    util = after.get("gpu_other_sm_util_pct")
    if util is not None and util >= settings.gpu_other_util_pct:
        reasons.append(f"other processes used the GPU (SM utilisation up to {util:g}%)")
    elif util is None and others:
        reasons.append(f"{others} other compute process{'es' if others > 1 else ''} on the GPU")
    slowdown = int(after.get("throttle_reasons") or 0)
    names = [name for bit, name in GPU_SLOWDOWN_REASONS.items() if slowdown & bit]
    if names:
        reasons.append("clocks slowed: " + ", ".join(names))
    return bool(reasons), "; ".join(reasons)


def gpu_load_snapshot(device_index: int = 0, since_us: int | None = None) -> dict[str, Any]:
    """Other processes on a GPU via NVML; {} when NVML is unavailable. Never raises.

    Keys: `gpu_other_processes` (compute processes other than this one; NVML reports host pids, so
    inside a PID namespace, where this process's pid is not among them, one of them is taken to be
    this process once it has initialised CUDA), `gpu_other_sm_util_pct` (the highest SM utilisation
    NVML sampled for any other pid since `since_us`, microseconds since the epoch; absent where NVML
    cannot tell, e.g. MIG) and `throttle_reasons` (the clock-event bitmask now).
    """
    snap: dict[str, Any] = {}
    with nvml_device(device_index) as opened:
        if opened is None:
            return {}
        pynvml, handle = opened
        me = os.getpid()
        try:
            pids = [int(p.pid) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        except Exception:
            return snap  # NVML cannot list processes here: nothing to say
        ours_unlisted = me not in pids and torch.cuda.is_initialized()
        others = [p for p in pids if p != me]
        snap["gpu_other_processes"] = max(0, len(others) - (1 if ours_unlisted else 0))
        try:
            samples = pynvml.nvmlDeviceGetProcessUtilization(handle, int(since_us or 0))
            other_util = [float(s.smUtil) for s in samples if int(s.pid) != me]
            if not ours_unlisted:  # else our own samples cannot be told apart: leave it unknown
                snap["gpu_other_sm_util_pct"] = max(other_util, default=0.0)
        except Exception:
            pass  # not supported here: the process count stands alone
        try:
            snap["throttle_reasons"] = _clock_event_reasons(pynvml, handle)
        except Exception:
            pass
    return snap


def time_watched(
    fn: Callable[[], object],
    device: torch.device | str,
    settings: TimingSettings,
    contention: ContentionSettings | None = None,
    deadline: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    family_of: int | None = None,
) -> tuple[Timing, dict[str, Any]]:
    """`time_callable` with the machine watched: (timing, its contention columns).

    Around the timing loop it takes `machine_snapshot`s (CPU) or `gpu_load_snapshot`s (CUDA) and
    applies `contention_verdict` / `gpu_contention_verdict`. While the timing is contended it is
    taken again, after `contention.backoff_s`, at most `contention.retries` times and only while
    another loop as long as the last one (and the back-off) ends before `deadline`
    (time.monotonic()). `family_of`: the pid of the sweep process that started this cell process,
    whose processes (the run's other cells) are the run's own load, not contention. The last timing
    is returned; columns: `contended`, `contention` (the reason, "" when not contended),
    `contention_retries_used`, and on CPU `other_cpu_cores`, `run_cpu_cores`, `other_busy_processes`,
    `load_avg_1m`, on CUDA `gpu_other_processes`, `gpu_other_sm_util_pct`.
    """
    contention = contention or ContentionSettings()
    device = torch.device(device)
    retries = 0
    while True:
        begin = time.monotonic()
        timing, columns = _timed_once(fn, device, settings, contention, family_of)
        took = time.monotonic() - begin
        out_of_time = deadline is not None and time.monotonic() + contention.backoff_s + took > deadline
        if not columns["contended"] or retries >= contention.retries or out_of_time:
            return timing, {**columns, "contention_retries_used": retries}
        retries += 1
        sleep(contention.backoff_s)


def _timed_once(
    fn: Callable[[], object], device: torch.device, settings: TimingSettings, contention: ContentionSettings, family_of: int | None = None
) -> tuple[Timing, dict]:
    """One `time_callable` loop and its contention columns (see `time_watched`)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        since_us = int(time.time() * 1e6)
        before = gpu_load_snapshot(index)
        timing = time_callable(fn, device, settings)
        after = gpu_load_snapshot(index, since_us)
        contended, reason = gpu_contention_verdict(before, after, contention)
        columns = {k: after[k] for k in ("gpu_other_processes", "gpu_other_sm_util_pct") if k in after}
        if "gpu_other_processes" in before:
            columns["gpu_other_processes"] = max(before["gpu_other_processes"], columns.get("gpu_other_processes", 0))
        return timing, {**columns, "contended": contended, "contention": reason}
    before = machine_snapshot(family_of=family_of)
    timing = time_callable(fn, device, settings)
    load = machine_load(before, machine_snapshot(family_of=family_of))
    args = (timing.cpu_shares, load.other_cores, load.load_avg_1m, load.busy_processes, contention)
    contended, reason = contention_verdict(*args, threads=timing.threads or 1, cores=usable_cores())
    return timing, {**load.as_row(), "contended": contended, "contention": reason}


# --------------------------------------------------------------------------- matmul rate

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
        return {"matmul_gflops": self.gflops, "matmul_n": self.n}


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


# --------------------------------------------------------------------------- memory


@dataclass
class MemoryReading:
    """Peak memory of one call above the baseline just before it, in MiB."""

    peak_mib: float
    reserved_mib: float | None
    method: str  # "cuda_max_memory_allocated" | "vmhwm_clear_refs" | "ru_maxrss"

    def as_row(self) -> dict:
        return {
            "peak_mem_mib": self.peak_mib,
            "peak_reserved_mib": self.reserved_mib,
            "mem_method": self.method,
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


# --------------------------------------------------------------------------- misc


def set_cpu_threads(n: int | None) -> int:
    """Set torch's intra-op thread count when ``n`` is given; return the count in effect."""
    if n is not None:
        if n < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


@contextmanager
def nvml_device(device_index: int = 0) -> Iterator[tuple[Any, Any] | None]:
    """(pynvml, handle of CUDA device `device_index`) with NVML initialised for the block and shut
    down after it; None when NVML or the device is unavailable. Errors inside the block propagate
    only as far as the caller's own probes let them: the NVML shutdown always runs."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        yield None
        return
    try:
        try:
            handle = _nvml_handle(pynvml, device_index)
        except Exception:
            handle = None
        yield (pynvml, handle) if handle is not None else None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _nvml_handle(pynvml, device_index: int):
    """NVML handle for CUDA device ``device_index``.

    NVML ignores CUDA_VISIBLE_DEVICES, so CUDA index i is translated through it (by
    UUID when torch has already initialised CUDA, else through the variable's entries).
    """
    if torch.cuda.is_initialized():
        try:
            uuid = str(torch.cuda.get_device_properties(device_index).uuid)
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        except Exception:
            pass  # older torch without .uuid, or a MIG slice: fall back to the variable
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        entry = entries[device_index]
        if entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
        return pynvml.nvmlDeviceGetHandleByUUID(entry)
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


def _clock_event_reasons(pynvml, handle) -> int:
    # Renamed from ...ThrottleReasons to ...EventReasons in newer NVML bindings.
    getter = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return int(getter(handle))


def nvml_snapshot(device_index: int = 0) -> dict:
    """Clocks (MHz), temperature (C) and power (W) of a GPU via NVML; {} when unavailable.

    Keys: sm_clock_mhz, sm_clock_max_mhz, mem_clock_mhz, temperature_c, power_w,
    power_limit_w, throttle_reasons (NVML bitmask). A field NVML refuses is left out.
    Never raises.
    """
    snap: dict = {}
    with nvml_device(device_index) as opened:
        if opened is None:
            return {}
        pynvml, handle = opened
        probes = {
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
            "throttle_reasons": lambda: _clock_event_reasons(pynvml, handle),
        }
        for key, probe in probes.items():
            try:
                snap[key] = probe()
            except Exception:
                pass
    return snap


def is_oom_error(exc: BaseException) -> bool:
    """True when ``exc`` is an out-of-memory failure (CUDA, Python or CPU allocator)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom_type is not None and isinstance(exc, oom_type)):
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc).lower()
        return any(m in message for m in _OOM_MESSAGES)
    return False
