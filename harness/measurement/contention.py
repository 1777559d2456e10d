"""Contention: whether other processes slowed a timing, and timing again when they did.

`time_watched` wraps `time_callable` (harness.measurement.timing): around the timing loop it reads
the machine (CPU: `machine_snapshot` / `machine_load`, the other processes' CPU time) or the GPU
(`gpu_load_snapshot`, NVML), judges the loop with `contention_verdict` / `gpu_contention_verdict`
under `ContentionSettings` (a suite's `measure.contention_*`), and re-measures a contended loop
after a back-off while the cell's time allows. The rule is described in docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from harness.measurement.gpu_timers import time_step
from harness.measurement.nvml import gpu_load_snapshot
from harness.measurement.timing import Timing, TimingSettings, median_of, usable_cores
from harness.store.schema import (
    CONTENDED,
    CONTENTION,
    CONTENTION_RETRIES_USED,
    GPU_OTHER_PROCESSES,
    GPU_OTHER_SM_UTIL_PCT,
    LOAD_AVG_1M,
    OTHER_BUSY_PROCESSES,
    OTHER_CPU_CORES,
    RUN_CPU_CORES,
)

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
        names = [setting.name for setting in dataclasses.fields(cls)]
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
            OTHER_CPU_CORES: self.other_cores,
            RUN_CPU_CORES: self.family_cores,
            OTHER_BUSY_PROCESSES: ", ".join(f"{name} {cores:.2f}" for name, cores in self.busy_processes),
            LOAD_AVG_1M: self.load_avg_1m,
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
    others = max(int(before.get(GPU_OTHER_PROCESSES) or 0), int(after.get(GPU_OTHER_PROCESSES) or 0))
    util = after.get(GPU_OTHER_SM_UTIL_PCT)
    if util is not None and util >= settings.gpu_other_util_pct:
        reasons.append(f"other processes used the GPU (SM utilisation up to {util:g}%)")
    elif util is None and others:
        reasons.append(f"{others} other compute process{'es' if others > 1 else ''} on the GPU")
    slowdown = int(after.get("throttle_reasons") or 0)
    names = [name for bit, name in GPU_SLOWDOWN_REASONS.items() if slowdown & bit]
    if names:
        reasons.append("clocks slowed: " + ", ".join(names))
    return bool(reasons), "; ".join(reasons)


def time_watched(
    fn: Callable[[], object],
    device: torch.device | str,
    settings: TimingSettings,
    contention: ContentionSettings | None = None,
    deadline: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    family_of: int | None = None,
    timer: str = "events",
) -> tuple[Timing, dict[str, Any]]:
    """`time_callable` (or the `timer` of harness.measurement.gpu_timers.time_step) with the
    machine watched: (timing, its contention columns).

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
        timing, columns = _timed_once(fn, device, settings, contention, family_of, timer)
        took = time.monotonic() - begin
        out_of_time = deadline is not None and time.monotonic() + contention.backoff_s + took > deadline
        if not columns[CONTENDED] or retries >= contention.retries or out_of_time:
            return timing, {**columns, CONTENTION_RETRIES_USED: retries}
        retries += 1
        sleep(contention.backoff_s)


def _timed_once(
    fn: Callable[[], object],
    device: torch.device,
    settings: TimingSettings,
    contention: ContentionSettings,
    family_of: int | None = None,
    timer: str = "events",
) -> tuple[Timing, dict]:
    """One timing loop (`time_step` with `timer`) and its contention columns (see `time_watched`)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        since_us = int(time.time() * 1e6)
        before = gpu_load_snapshot(index)
        timing = time_step(fn, device, settings, timer)
        after = gpu_load_snapshot(index, since_us)
        contended, reason = gpu_contention_verdict(before, after, contention)
        columns = {k: after[k] for k in (GPU_OTHER_PROCESSES, GPU_OTHER_SM_UTIL_PCT) if k in after}
        if GPU_OTHER_PROCESSES in before:
            columns[GPU_OTHER_PROCESSES] = max(before[GPU_OTHER_PROCESSES], columns.get(GPU_OTHER_PROCESSES, 0))
        return timing, {**columns, CONTENDED: contended, CONTENTION: reason}
    before = machine_snapshot(family_of=family_of)
    timing = time_step(fn, device, settings, timer)
    load = machine_load(before, machine_snapshot(family_of=family_of))
    args = (timing.cpu_shares, load.other_cores, load.load_avg_1m, load.busy_processes, contention)
    contended, reason = contention_verdict(*args, threads=timing.threads or 1, cores=usable_cores())
    return timing, {**load.as_row(), CONTENDED: contended, CONTENTION: reason}
