"""Timing a call: per-repeat wall times (CUDA events on GPU, ``time.perf_counter_ns`` on CPU, with the
process CPU time of each repeat on CPU) and their summary statistics (`Timing`).

Follows shared/reference/measurement.md: warm-up calls first, then repeats until both a minimum
count and a minimum time are reached, within hard caps; on CUDA an optional L2 flush before each
repeat, untimed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from harness.store.schema import (
    BACKWARD_MS_IQR,
    BACKWARD_MS_MEDIAN,
    BACKWARD_MS_SAMPLES,
    CPU_SHARE,
    CPU_SHARE_SAMPLES,
    CPU_TIME_MS_MEDIAN,
    CPU_TIME_MS_SAMPLES,
    FORWARD_MS_IQR,
    FORWARD_MS_MEDIAN,
    FORWARD_MS_SAMPLES,
    N_REPEATS,
    TIME_MS_IQR,
    TIME_MS_MAX,
    TIME_MS_MEAN,
    TIME_MS_MEDIAN,
    TIME_MS_MIN,
    TIME_MS_SAMPLES,
    TIME_NOISY,
    TIMER,
)
from harness.units import MIB

NOISE_THRESHOLD = 0.10  # IQR / median above which a timing is flagged, as torch.utils.benchmark does
L2_FLUSH_BYTES = 256 * MIB  # larger than any current GPU's L2 (H100: 50 MB), as triton's do_bench


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


@dataclass(frozen=True)
class PhasedStep:
    """A step in two phases: `forward()` returns what `backward(it)` needs (the loss); `backward`
    None for a step without one. Calling it runs both, so it is a plain step too; `time_callable`
    times each phase apart within every repeat (one clock reading, or CUDA event, between them)."""

    forward: Callable[[], Any]
    backward: Callable[[Any], Any] | None = None

    def __call__(self) -> Any:
        out = self.forward()
        return out if self.backward is None else self.backward(out)

    @property
    def phases(self) -> tuple[str, ...]:
        """The names of its phases: ("forward",) or ("forward", "backward")."""
        return PHASES[:1] if self.backward is None else PHASES


PHASES = ("forward", "backward")  # not a column: the phase names of a PhasedStep
PHASE_COLUMNS = {  # phase -> (median, IQR, samples) columns
    "forward": (FORWARD_MS_MEDIAN, FORWARD_MS_IQR, FORWARD_MS_SAMPLES),
    "backward": (BACKWARD_MS_MEDIAN, BACKWARD_MS_IQR, BACKWARD_MS_SAMPLES),
}


def phase_columns(phase_samples: dict[str, list[float]]) -> dict[str, Any]:
    """Result-row columns of per-phase samples (ms): median, IQR and samples of each phase."""
    row: dict[str, Any] = {}
    for phase, samples in phase_samples.items():
        median, iqr, column = PHASE_COLUMNS[phase]
        ordered = sorted(float(v) for v in samples)
        row.update(
            {median: _quantile(ordered, 0.5), iqr: _quantile(ordered, 0.75) - _quantile(ordered, 0.25), column: [float(v) for v in samples]}
        )
    return row


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
    # A PhasedStep's phases: phase name -> its time in each repeat, ms (the repeats of samples_ms).
    phase_samples_ms: dict[str, list[float]] = field(default_factory=dict)
    _sorted: list[float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.samples_ms = [float(s) for s in self.samples_ms]
        self._sorted = sorted(self.samples_ms)

    @property
    def n_repeats(self) -> int:
        """Timed calls."""
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        """Median of the samples, ms."""
        return _quantile(self._sorted, 0.5)

    @property
    def iqr_ms(self) -> float:
        """p75 - p25 in ms (0 for a single sample)."""
        return _quantile(self._sorted, 0.75) - _quantile(self._sorted, 0.25)

    @property
    def min_ms(self) -> float:
        """Fastest sample, ms (NaN without samples)."""
        return self._sorted[0] if self._sorted else math.nan

    @property
    def max_ms(self) -> float:
        """Slowest sample, ms (NaN without samples)."""
        return self._sorted[-1] if self._sorted else math.nan

    @property
    def mean_ms(self) -> float:
        """Mean of the samples, ms (NaN without samples)."""
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
            TIME_MS_MEDIAN: self.median_ms,
            TIME_MS_IQR: self.iqr_ms,
            TIME_MS_MIN: self.min_ms,
            TIME_MS_MAX: self.max_ms,
            TIME_MS_MEAN: self.mean_ms,
            TIME_MS_SAMPLES: list(self.samples_ms),
            N_REPEATS: self.n_repeats,
            TIME_NOISY: self.noisy,
            TIMER: self.timer,
            **(
                {}
                if self.cpu_samples_ms is None
                else {
                    CPU_TIME_MS_SAMPLES: [float(s) for s in self.cpu_samples_ms],
                    CPU_TIME_MS_MEDIAN: _quantile(sorted(self.cpu_samples_ms), 0.5),
                }
            ),
            **({CPU_SHARE_SAMPLES: self.cpu_shares, CPU_SHARE: median_of(self.cpu_shares)} if self.cpu_shares else {}),
            **phase_columns(self.phase_samples_ms),
        }


def repeats_done(n: int, elapsed_s: float, s: TimingSettings) -> bool:
    """Whether a repeat loop that took `n` repeats in `elapsed_s` seconds is done under `s`."""
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

    A `PhasedStep` is timed phase by phase within each repeat: one more clock reading (CPU) or
    CUDA event (GPU) between its forward and its backward, so the phases of a repeat add up to
    its total (`Timing.phase_samples_ms`).
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
    phased = fn if isinstance(fn, PhasedStep) else None
    forward: list[float] = []
    backward: list[float] = []
    start = time.perf_counter()
    while not repeats_done(len(samples), time.perf_counter() - start, settings):
        c0 = time.process_time_ns()
        t0 = time.perf_counter_ns()
        if phased is None:
            out = fn()
            tm = t1 = time.perf_counter_ns()
        else:
            out = phased.forward()
            tm = t1 = time.perf_counter_ns()
            if phased.backward is not None:
                out = phased.backward(out)
                t1 = time.perf_counter_ns()
        c1 = time.process_time_ns()
        del out  # free the result outside the timed region
        samples.append((t1 - t0) / 1e6)
        cpu_samples.append((c1 - c0) / 1e6)
        forward.append((tm - t0) / 1e6)
        backward.append((t1 - tm) / 1e6)
    phases = {} if phased is None else dict(zip(phased.phases, (forward, backward)))
    return Timing(samples, timer="perf_counter_ns", cpu_samples_ms=cpu_samples, threads=threads, phase_samples_ms=phases)


def _time_cuda(fn: Callable[[], object], device: torch.device, settings: TimingSettings) -> Timing:
    with torch.cuda.device(device):
        for _ in range(settings.warmup):
            fn()
        torch.cuda.synchronize()
        flush_buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if settings.flush_l2 else None
        samples: list[float] = []
        phased = fn if isinstance(fn, PhasedStep) else None
        forward: list[float] = []
        backward: list[float] = []
        start_wall = time.perf_counter()
        while not repeats_done(len(samples), time.perf_counter() - start_wall, settings):
            if flush_buf is not None:
                flush_buf.zero_()  # enqueued before the start event, so not timed
            begin, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            begin.record()
            if phased is None:
                out = fn()
            else:
                out = phased.forward()
                middle.record()
                if phased.backward is not None:
                    out = phased.backward(out)
            end.record()
            torch.cuda.synchronize()
            del out
            samples.append(begin.elapsed_time(end))
            if phased is not None:
                forward.append(begin.elapsed_time(middle))
                backward.append(middle.elapsed_time(end))
        if flush_buf is not None:
            # Hand the flush buffer back so it does not inflate a later reserved-memory reading.
            del flush_buf
            torch.cuda.empty_cache()
    phases = {} if phased is None else dict(zip(phased.phases, (forward, backward)))
    return Timing(samples, timer="cuda_event", phase_samples_ms=phases)


def set_cpu_threads(n: int | None) -> int:
    """Set torch's intra-op thread count when ``n`` is given; return the count in effect."""
    if n is not None:
        if n < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()
