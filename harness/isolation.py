"""Isolation: run one cell's work in a fresh spawned process and turn whatever happens into a row.

The one isolation of every kind of cell (benchmark and training cells alike, `harness.cells`):
the child ignores SIGINT and dies with its parent, sets its worker slot's environment, and starts
its memory limit; the parent watches it and kills it at its limit, its timeout, or an interrupt.

The memory limit means resident memory. On CPU the parent watches the cell process's RSS above
what it held once torch was imported (the baseline the child reports) and kills it at the limit,
recording `oom` with the resident peak it saw; an address-space limit of twice that plus 2 GiB
stays only as a backstop against an allocation faster than the watch (`WATCH_INTERVAL_S`). On
CUDA a cell limits itself (the caching allocator's share of the GPU).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import psutil
import torch

from harness import measurement
from harness.store.schema import MEMORY_LIMIT_MIB, MESSAGE, STATUS, STATUS_ERROR, STATUS_OOM, STATUS_TIMEOUT
from harness.units import GIB, MIB

DEFAULT_MEMORY_FRACTION = 0.75  # of total RAM, per CPU cell, when the suite sets no limit ...
AVAILABLE_MEMORY_FRACTION = 0.9  # ... and at most this much of what is available when it starts
WATCH_INTERVAL_S = 0.05  # how often the parent reads a CPU cell's resident memory

BACKSTOP_FACTOR, BACKSTOP_EXTRA = 2, 2 * GIB  # address space allowed: factor x limit + extra


# --------------------------------------------------------------------------- memory limits


def default_memory_limit_bytes() -> int:
    """75% of RAM, but never more than 90% of the memory available now (so a cell cannot wake the
    OOM killer): the budget of a cell whose suite sets no `memory_limit_gib` (and of training cells)."""
    memory = psutil.virtual_memory()
    return int(min(memory.total * DEFAULT_MEMORY_FRACTION, memory.available * AVAILABLE_MEMORY_FRACTION))


def start_memory_limit(limit: int, report_baseline: Callable[[int], None] | None) -> None:
    """In a CPU cell's process: set the address-space backstop for `limit` bytes, then report the
    resident memory now (bytes) through `report_baseline`, the point the parent's watch counts from."""
    _limit_address_space(limit)
    if report_baseline is not None:
        report_baseline(measurement.read_proc_status_kib("VmRSS") * 1024)


def _limit_address_space(limit: int) -> None:
    """Backstop for CPU cells: cap this process's address space at its current size plus
    BACKSTOP_FACTOR x `limit` + BACKSTOP_EXTRA bytes. Address space is not memory (threads, arenas
    and mappings reserve far more than they touch), so this only stops an allocation too large and
    too fast for the RSS watch; beyond it allocations fail (recorded as `oom`). An existing hard
    limit is kept (it cannot be raised)."""
    current = measurement.read_proc_status_kib("VmSize") * 1024
    allowed = current + BACKSTOP_FACTOR * limit + BACKSTOP_EXTRA
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = allowed if hard == resource.RLIM_INFINITY else min(allowed, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class ResidentMemoryWatch:
    """The parent's watch over a CPU cell process: its resident memory above `baseline` bytes
    (reported by the child once torch is imported), the peak seen, and whether it passed `limit`."""

    def __init__(self, pid: int, limit: int):
        self.process, self.limit = psutil.Process(pid), limit
        self.baseline: int | None = None
        self.peak = 0  # bytes above the baseline, the highest reading so far

    def over_limit(self) -> bool:
        """Read RSS now; True once it is more than `limit` above the baseline."""
        if self.baseline is None:
            return False
        try:
            resident = self.process.memory_info().rss - self.baseline
        except psutil.Error:  # the process is gone; its exit is handled by the caller
            return False
        self.peak = max(self.peak, resident)
        return resident > self.limit

    def oom_row(self) -> dict[str, Any]:
        """The row of a cell killed at the limit."""
        return {
            STATUS: STATUS_OOM,
            MEMORY_LIMIT_MIB: self.limit / MIB,
            "rss_peak_mib": self.peak / MIB,
            MESSAGE: f"resident memory {self.peak / MIB:.0f} MiB above the cell's start passed its memory limit "
            f"{self.limit / GIB:.3g} GiB (measure.memory_limit_gib); the cell process was killed",
        }


# --------------------------------------------------------------------------- one process per cell


def _die_with_parent(parent_pid: int) -> None:
    """Have Linux SIGKILL this process when its parent dies, so a killed run leaves no orphans."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)


THREADS_ENV = "REFORMER_HARNESS_THREADS"  # set by the pool executor: torch threads when the suite sets none


def _apply_env(env: dict[str, str] | None) -> None:
    """Apply a worker slot's environment in the cell process, before CUDA is initialised
    (torch reads CUDA_VISIBLE_DEVICES at CUDA's first use, not at import)."""
    if not env:
        return
    os.environ.update(env)
    if env.get(THREADS_ENV):
        torch.set_num_threads(int(env[THREADS_ENV]))  # a suite's measure.threads still wins in measure_cell


def _child(work: Callable[..., dict], args: tuple, connection: Any, parent_pid: int, env: dict[str, str] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent handles it
    _die_with_parent(parent_pid)
    _apply_env(env)
    try:
        try:
            row = work(*args, report_baseline=lambda rss: connection.send({BASELINE_MESSAGE: rss}))
        except BaseException as error:  # noqa: BLE001 - report rather than die with a traceback
            row = {STATUS: STATUS_ERROR, MESSAGE: f"{type(error).__name__}: {error}"}
        connection.send(row)
    finally:
        connection.close()


BASELINE_MESSAGE = "memory_baseline_bytes"  # the child's first message: its RSS when the limit starts


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (possibly the kernel's OOM killer)" if -exitcode == signal.SIGKILL else ""
        return f"worker process killed by signal {name}{hint}"
    return f"worker process exited with code {exitcode} without a result"


_LIVE: set[Any] = set()  # cell processes running now (several with the pool executor)
_LIVE_LOCK = threading.Lock()


def kill_live_cells() -> None:
    """Kill every cell process still running (an interrupted parallel run)."""
    with _LIVE_LOCK:
        for process in list(_LIVE):
            if process.is_alive():
                process.kill()


def run_isolated(
    work: Callable[..., dict],
    args: tuple,
    timeout_s: float,
    memory_limit: int | None,
    env: dict[str, str] | None = None,
    what: str = "cell",
) -> dict[str, Any]:
    """`work(*args, report_baseline=...) -> row` in a fresh spawned process: the one isolation of
    every kind of cell (harness.cells: benchmark and training cells).

    The child ignores SIGINT (the parent handles Ctrl-C and SIGTERM, then kills it), dies with the
    parent (PR_SET_PDEATHSIG), sets `env` first, and calls `report_baseline(rss_bytes)` once it
    has set its address-space backstop (`start_memory_limit`). With `memory_limit` (bytes, CPU) the
    parent watches its resident memory above that baseline and kills it at the limit (an `oom`
    row). A child that runs past `timeout_s`, or dies without a row, becomes a `timeout` / `error`
    row; `work`'s own exceptions become `error` rows (work should turn its expected failures into
    rows itself). `what` names the cell in messages.
    """
    context = mp.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(work, args, sender, os.getpid(), env), daemon=True)
    process.start()
    with _LIVE_LOCK:
        _LIVE.add(process)
    sender.close()
    deadline = time.monotonic() + timeout_s
    watch = ResidentMemoryWatch(process.pid, memory_limit) if memory_limit is not None else None
    received = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {STATUS: STATUS_TIMEOUT, MESSAGE: f"{what} did not finish within timeout_s={timeout_s:g}"}
            if receiver.poll(min(WATCH_INTERVAL_S, remaining)):
                try:
                    message = receiver.recv()
                except EOFError:  # the child died before sending
                    process.join(30)
                    return {STATUS: STATUS_ERROR, MESSAGE: _describe_exit(process.exitcode)}
                if isinstance(message, dict) and BASELINE_MESSAGE in message:
                    if watch is not None:
                        watch.baseline = int(message[BASELINE_MESSAGE])
                    continue
                received = True
                return message
            if watch is not None and watch.over_limit():
                process.kill()
                return watch.oom_row()
    finally:
        if received:
            process.join(10)  # let a child that has sent its row exit normally
        if process.is_alive():  # timed out, hung after sending, or we are interrupted
            process.kill()
        process.join()
        receiver.close()
        with _LIVE_LOCK:
            _LIVE.discard(process)


# --------------------------------------------------------------------------- signals


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"received signal {signal.Signals(signum).name}")


@contextmanager
def interrupt_guard() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt, so a terminated run stops cleanly
    (the running cell's process is killed, finished cells are already on disk)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
