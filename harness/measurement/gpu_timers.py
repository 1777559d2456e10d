"""The timers of `measure.timer` (docs/decisions.md, "Where the time goes"): `time_step` picks one.

- `events` (the default): `time_callable`, CUDA events around each repeat (and its phases) on
  GPU, perf_counter_ns on CPU. Includes the gaps between kernels (launch latency, host work).
- `kernels` (CUDA only): every repeat runs under torch.profiler with CUDA activity, each phase
  inside a `record_function` range and followed by a synchronize; a phase's time is the device
  time its kernels (and copies) were busy, the union of their intervals (`kernel_phase_times`):
  launch gaps and host overhead are left out. tritonbench's and flash-attention's way of timing
  noisy small kernels.
- `graphs` (CUDA only): the step captured once as CUDA graphs (forward and backward apart, one
  memory pool) after a warm-up on a side stream, then the replays timed with CUDA events: launch
  overhead is left out, the kernels' own gaps stay. A step that cannot be captured raises
  `GraphCaptureError` (the cell then says so in its message and is timed with events).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import torch

from harness.measurement.timing import PhasedStep, Timing, TimingSettings, repeats_done, time_callable

TIMER_SETTING = "timer"  # not a column: the key of a suite's measure.timer
TIMERS = ("events", "kernels", "graphs")  # not a column: the values of a suite's measure.timer
CUDA_ONLY_TIMERS = ("kernels", "graphs")  # not a column: the timers a CPU cell refuses
RANGE_PREFIX = "harness.repeat."  # not a column: the record_function ranges `time_kernels` marks phases with


class GraphCaptureError(RuntimeError):
    """The step could not be captured as a CUDA graph (a host sync, a CPU tensor, dynamic shapes...)."""


@dataclass(frozen=True)
class DeviceInterval:
    """One profiler event: `name`, on the device (`on_device`) or a host range, start and end in ns."""

    name: str
    on_device: bool
    start_ns: int
    end_ns: int


def time_step(fn: Callable[[], object], device: torch.device | str, settings: TimingSettings, timer: str = "events") -> Timing:
    """Time `fn` with `timer` (TIMERS); ValueError for `kernels` / `graphs` off CUDA or an unknown name."""
    device = torch.device(device)
    if timer not in TIMERS:
        raise ValueError(f"unknown timer {timer!r}; one of {', '.join(TIMERS)}")
    if timer == "events":
        return time_callable(fn, device, settings)
    if device.type != "cuda":
        raise ValueError(f"measure.timer {timer!r} needs a CUDA device (this cell runs on {device.type}); use 'events'")
    if timer == "kernels":
        return time_kernels(fn, device, settings)
    return time_graphs(fn, device, settings)


def _phased(fn: Callable[[], object]) -> PhasedStep:
    return fn if isinstance(fn, PhasedStep) else PhasedStep(fn)


def time_kernels(fn: Callable[[], object], device: torch.device, settings: TimingSettings) -> Timing:
    """Device-busy time per repeat and phase from torch.profiler's CUDA activity (see the module
    docstring); `Timing.timer` "cuda_kernels"."""
    from torch.profiler import ProfilerActivity, profile, record_function

    step = _phased(fn)
    with torch.cuda.device(device):
        for _ in range(settings.warmup):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            repeats, start = 0, time.perf_counter()
            while not repeats_done(repeats, time.perf_counter() - start, settings):
                with record_function(f"{RANGE_PREFIX}{repeats}.forward"):
                    out: Any = step.forward()
                    torch.cuda.synchronize()
                if step.backward is not None:
                    with record_function(f"{RANGE_PREFIX}{repeats}.backward"):
                        out = step.backward(out)
                        torch.cuda.synchronize()
                del out
                repeats += 1
        events = [
            DeviceInterval(e.name(), e.device_type() == torch.autograd.DeviceType.CUDA, int(e.start_ns()), int(e.end_ns()))
            for e in prof.profiler.kineto_results.events()
        ]
    phases = kernel_phase_times(events, repeats, step.phases)
    totals = [sum(phases[phase][i] for phase in step.phases) for i in range(repeats)]
    return Timing(totals, timer="cuda_kernels", phase_samples_ms=phases if isinstance(fn, PhasedStep) else {})


def busy_ms(intervals: Iterable[tuple[int, int]]) -> float:
    """The length of the union of [start, end) intervals in ns, as ms (overlapping kernels count once)."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start >= reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total / 1e6


def kernel_phase_times(events: list[DeviceInterval], repeats: int, phases: tuple[str, ...]) -> dict[str, list[float]]:
    """Per phase, the device-busy ms of each repeat: the union of the device events (not the
    device-side copies of the host ranges, named RANGE_PREFIX...) that start within the host range
    "<RANGE_PREFIX><repeat>.<phase>" (each phase ends with a synchronize, so its kernels start
    after its range begins and finish before it ends). 0 for a phase that ran no kernel."""
    ranges = {e.name: (e.start_ns, e.end_ns) for e in events if not e.on_device and e.name.startswith(RANGE_PREFIX)}
    device = sorted((e.start_ns, e.end_ns) for e in events if e.on_device and not e.name.startswith(RANGE_PREFIX))
    out: dict[str, list[float]] = {phase: [] for phase in phases}
    for repeat in range(repeats):
        for phase in phases:
            begin, end = ranges.get(f"{RANGE_PREFIX}{repeat}.{phase}", (0, -1))
            out[phase].append(busy_ms((s, min(e, end)) for s, e in device if begin <= s <= end))
    return out


def time_graphs(fn: Callable[[], object], device: torch.device, settings: TimingSettings) -> Timing:
    """Capture the step as CUDA graphs and time their replays with CUDA events (see the module
    docstring); `Timing.timer` "cuda_graph". GraphCaptureError when the step cannot be captured."""
    step = _phased(fn)
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(max(settings.warmup, 3)):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graphs = [torch.cuda.CUDAGraph() for _ in step.phases]
        try:
            with torch.cuda.graph(graphs[0]):
                static = step.forward()
            if step.backward is not None:
                with torch.cuda.graph(graphs[1], pool=graphs[0].pool()):
                    step.backward(static)
        except Exception as error:
            raise GraphCaptureError(f"the step could not be captured as a CUDA graph: {type(error).__name__}: {error}") from error
        second = graphs[1] if len(graphs) > 1 else None
        replay = PhasedStep(graphs[0].replay, None if second is None else (lambda _: second.replay()))
        timing = time_callable(replay if isinstance(fn, PhasedStep) else graphs[0].replay, device, replace(settings, warmup=1))
    return replace(timing, timer="cuda_graph")
