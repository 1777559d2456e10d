"""Run cells, each in a fresh spawned process, and turn every outcome into a result row.

A cell's process sets its thread count and a memory limit, builds the workload, warms up, measures
peak memory on one call, then times repeated calls (and, with the suite's `measure.matmul_rate`,
then measures the device's matmul rate for the compute floor, `floor_columns`). Whatever happens
(OOM, exception, timeout, a crash that kills the process) the parent records a row and goes on.

The memory limit means resident memory. On CPU the parent watches the cell process's RSS above
what it held once torch was imported (the baseline the child reports) and kills it at the limit,
recording `oom` with the resident peak it saw; an address-space limit of twice that plus 2 GiB
stays only as a backstop against an allocation faster than the watch (`WATCH_INTERVAL_S`). On
CUDA the limit is the caching allocator's share of the GPU (`set_per_process_memory_fraction`).
"""

from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
import resource
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import psutil
import torch

from harness import measure
from harness.environment import device_name
from harness.suite import Cell, estimate_seconds
from variants.registry import VariantUnavailable

if TYPE_CHECKING:  # pandas is not imported into cell processes: it would slow every start
    from harness.results import RunStore

DEFAULT_MEMORY_FRACTION = 0.75  # of total RAM, per CPU cell, when the suite sets no limit ...
AVAILABLE_MEMORY_FRACTION = 0.9  # ... and at most this much of what is available when it starts
GIB = 1024**3
MIB = 1024**2
FAILED_STATUSES = ("oom", "timeout")  # statuses after which longer lengths of a variant are skipped
WATCH_INTERVAL_S = 0.05  # how often the parent reads a CPU cell's resident memory
BACKSTOP_FACTOR, BACKSTOP_EXTRA = 2, 2 * GIB  # address space allowed: factor x limit + extra


@dataclass
class RunOptions:
    """How the runner treats cells: isolation, code identity, where progress lines go."""

    code_version: str
    run_id: str
    in_process: bool = False
    print_line: Callable[[str], None] = field(default=lambda line: print(line, flush=True))


# --------------------------------------------------------------------------- inside a cell


def default_memory_limit_bytes() -> int:
    """75% of RAM, but never more than 90% of the memory available now (so a cell cannot wake the
    OOM killer): the budget of a cell whose suite sets no `memory_limit_gib` (and of training cells)."""
    memory = psutil.virtual_memory()
    return int(min(memory.total * DEFAULT_MEMORY_FRACTION, memory.available * AVAILABLE_MEMORY_FRACTION))


def memory_limit_bytes(cell: Cell) -> int:
    """The per-cell budget of resident memory in bytes, above the cell process's baseline: the
    suite's `memory_limit_gib`, else `default_memory_limit_bytes()`."""
    gib = cell.measure.get("memory_limit_gib")
    return int(gib * GIB) if gib else default_memory_limit_bytes()


def start_memory_limit(limit: int, report_baseline: Callable[[int], None] | None) -> None:
    """In a CPU cell's process: set the address-space backstop for `limit` bytes, then report the
    resident memory now (bytes) through `report_baseline`, the point the parent's watch counts from."""
    _limit_address_space(limit)
    if report_baseline is not None:
        report_baseline(measure.read_proc_status_kib("VmRSS") * 1024)


def _limit_address_space(limit: int) -> None:
    """Backstop for CPU cells: cap this process's address space at its current size plus
    BACKSTOP_FACTOR x `limit` + BACKSTOP_EXTRA bytes. Address space is not memory (threads, arenas
    and mappings reserve far more than they touch), so this only stops an allocation too large and
    too fast for the RSS watch; beyond it allocations fail (recorded as `oom`). An existing hard
    limit is kept (it cannot be raised)."""
    current = measure.read_proc_status_kib("VmSize") * 1024
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
            "status": "oom",
            "memory_limit_mib": self.limit / MIB,
            "rss_peak_mib": self.peak / MIB,
            "message": f"resident memory {self.peak / MIB:.0f} MiB above the cell's start passed its memory limit "
            f"{self.limit / GIB:.3g} GiB (measure.memory_limit_gib); the cell process was killed",
        }


def _limit_cuda_memory(cell: Cell, device: torch.device) -> int | None:
    """Cap the caching allocator at the suite's `memory_limit_gib` (only when set); bytes or None.

    RLIMIT_AS cannot be used with CUDA: the driver reserves far more address space than memory.
    """
    gib = cell.measure.get("memory_limit_gib")
    if not gib:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), device)
    return int(min(gib * GIB, total))


def measure_cell(cell: Cell, limit_memory: bool = True, report_baseline: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Build and measure one cell in this process; return its metric columns (status included).

    With `limit_memory` on CPU, `report_baseline(rss_bytes)` is called once the address-space
    backstop is set: the resident memory the parent's watch counts the limit from.

    Exceptions (out-of-memory included) become `oom` / `error` rows; KeyboardInterrupt and
    SystemExit propagate so an interrupted in-process run stops.
    """
    from harness.workloads import build_workload  # imports torch-heavy variants lazily

    row: dict[str, Any] = {}
    try:
        device = torch.device(cell.device)
        row["threads"] = measure.set_cpu_threads(cell.measure.get("threads"))
        row["device_name"] = device_name(cell.device)
        limit = None
        if device.type == "cuda":
            row.update({f"nvml_before_{k}": v for k, v in measure.nvml_snapshot(device.index or 0).items()})
            if limit_memory:
                limit = _limit_cuda_memory(cell, device)
        elif limit_memory:
            limit = memory_limit_bytes(cell)
            start_memory_limit(limit, report_baseline)
        if limit is not None:
            row["memory_limit_mib"] = limit / MIB
        workload = build_workload(cell, device)
        settings = measure.TimingSettings(
            **{k: cell.measure[k] for k in ("warmup", "min_repeats", "min_time_s", "max_repeats", "max_time_s", "flush_l2")}
        )
        for _ in range(settings.warmup):
            workload.step()
        memory = measure.measure_peak_memory(workload.step, device)
        timing = measure.time_callable(workload.step, device, replace(settings, warmup=0))
    except VariantUnavailable as error:  # not applicable here (missing optional package, no kernel)
        return {**row, "status": "skipped", "message": f"variant unavailable: {error}"[:4000]}
    except Exception as error:  # every failure becomes data
        status = "oom" if measure.is_oom_error(error) else "error"
        message = f"{type(error).__name__}: {error}"
        if status == "oom" and "memory_limit_mib" in row:
            message += f" (memory limit {row['memory_limit_mib'] / 1024:.3g} GiB)"
        if status == "error":
            message += "\n" + "".join(traceback.format_exception(error)[-3:])
        return {**row, "status": status, "message": message[:4000]}
    seconds = timing.median_ms / 1000
    row.update(timing.as_row())
    row.update(memory.as_row())
    row.update(
        status="ok",
        message="",
        flops=workload.flops,
        tokens_per_s=workload.tokens / seconds if seconds > 0 else math.nan,
        tflops_per_s=workload.flops / seconds / 1e12 if seconds > 0 else math.nan,
        n_params=sum(p.numel() for p in workload.module.parameters()),
    )
    if device.type == "cuda":  # the clocks right after the timing, before any matmul probe
        row.update({f"nvml_after_{k}": v for k, v in measure.nvml_snapshot(device.index or 0).items()})
    if cell.measure.get("matmul_rate"):
        del workload  # its memory is released first, so the probe cannot run out of it
        row.update(_probe_matmul(cell, device))
        row.update(floor_columns(row))
    return row


def _probe_matmul(cell: Cell, device: torch.device) -> dict[str, Any]:
    """`matmul_gflops` / `matmul_n` of `measure.measure_matmul` in the cell's dtype, measured right
    after the cell's timing; a failed probe leaves the cell ok, with NaN and the reason in `message`."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        measure.release_free_heap()
    try:
        return measure.measure_matmul(device, cell.dtype).as_row()
    except Exception as error:  # e.g. out of memory under a tight memory_limit_gib
        return {"matmul_gflops": math.nan, "matmul_n": None, "message": f"matmul_rate probe failed: {type(error).__name__}: {error}"[:4000]}


def floor_columns(row: Mapping[str, Any]) -> dict[str, float]:
    """The compute-floor columns of a result row that has `matmul_gflops` (else {}), the one place
    they are defined:

    - `floor_s` = flops / (matmul_gflops * 1e9): seconds the cell's analytic FLOPs (forward, plus
      2x those with a backward, `workloads.step_flops`) would take at the measured matmul rate;
    - `floor_ratio` = (time_ms_median / 1e3) / floor_s: the median time per step over that floor
      (1 = the step runs at the matmul rate; a target "within 1.5x of the floor" is floor_ratio <= 1.5).

    NaN where an input is missing, not finite or not positive.
    """
    if "matmul_gflops" not in row:
        return {}

    def number(key: str) -> float:
        value = row.get(key)
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return math.nan
        return value if math.isfinite(value) and value > 0 else math.nan

    flops, gflops, median_ms = number("flops"), number("matmul_gflops"), number("time_ms_median")
    floor_s = flops / (gflops * 1e9)
    return {"floor_s": floor_s, "floor_ratio": median_ms / 1e3 / floor_s}


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
            row = {"status": "error", "message": f"{type(error).__name__}: {error}"}
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


def run_cell_isolated(cell: Cell, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Measure `cell` (`measure_cell`) in a fresh spawned process (`run_isolated`): its metric
    columns, or a row for a timeout, an `oom` at the memory limit (CPU) or a crash.

    `env` is set in the child before it measures (e.g. CUDA_VISIBLE_DEVICES of a worker slot, or
    THREADS_ENV). `timeout_s` counts from the process start (interpreter and torch import included).
    """
    limit = None if cell.device.startswith("cuda") else memory_limit_bytes(cell)
    return run_isolated(measure_in_cell_process, (cell,), float(cell.measure.get("timeout_s") or 900), limit, env)


def measure_in_cell_process(cell: Cell, report_baseline: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The work of a benchmark cell's own process: `measure_cell` with the memory limit on (looked
    up in the child, so a parent that replaced `measure_cell` cannot leak into the cell)."""
    return measure_cell(cell, report_baseline=report_baseline)


def run_isolated(
    work: Callable[..., dict],
    args: tuple,
    timeout_s: float,
    memory_limit: int | None,
    env: dict[str, str] | None = None,
    what: str = "cell",
) -> dict[str, Any]:
    """`work(*args, report_baseline=...) -> row` in a fresh spawned process: the one isolation of
    every kind of cell (benchmark cells here, training cells in harness.quality).

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
                return {"status": "timeout", "message": f"{what} did not finish within timeout_s={timeout_s:g}"}
            if receiver.poll(min(WATCH_INTERVAL_S, remaining)):
                try:
                    message = receiver.recv()
                except EOFError:  # the child died before sending
                    process.join(30)
                    return {"status": "error", "message": _describe_exit(process.exitcode)}
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


# --------------------------------------------------------------------------- the sweep


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _progress_line(done: int, total: int, eta_s: float, row: dict[str, Any]) -> str:
    width = 20
    filled = int(width * done / max(total, 1))
    bar = "#" * filled + "-" * (width - filled)
    what = f"{row['variant_label']:<24} L={row['seq_len']:<6} B={row['batch']:<4}"
    if row["status"] == "ok":
        median, iqr = row.get("time_ms_median", math.nan), row.get("time_ms_iqr", math.nan)
        spread = 100 * iqr / median if median else 0.0
        noisy = " NOISY" if row.get("time_noisy") else ""
        result = f"ok  {median:10.2f} ms (IQR {spread:4.1f}%{noisy})  {row.get('peak_mem_mib', math.nan):9.1f} MiB"
    else:
        message = str(row.get("message") or "")
        result = f"{row['status'].upper()}  {message.splitlines()[0][:70] if message else ''}"
    return f"[{bar}] {done:>3}/{total} ETA {_format_eta(eta_s):>7} | {what} {result}"


def stale_keys(cells: list[Cell], rows: list[dict], code_version: str) -> dict[str, list[str]]:
    """Current key of a cell -> keys of stored `rows` holding the same cell under another code version."""
    stored = {r.get("cell_key") for r in rows}
    versions = {r.get("code_version") for r in rows} - {code_version, None}
    out: dict[str, list[str]] = {}
    for cell in cells:
        old = [key for version in sorted(versions) if (key := cell.key(version)) in stored]
        if old:
            out[cell.key(code_version)] = old
    return out


class Sweep:
    """The cells of one `run_cells` call still to run, and what they share: resume state, skips
    after OOM, stale rows to replace, progress and ETA. `run_one` is thread-safe so executors can
    run several groups at once (the cells of one group must run in order, in one thread)."""

    def __init__(self, cells: list[Cell], store: RunStore, options: RunOptions):
        self.store, self.options = store, options
        self.version = version = options.code_version
        stored = {r["cell_key"]: r for r in store.rows() if "cell_key" in r}
        finished = store.finished_keys()
        self.stale = stale_keys(cells, list(stored.values()), version)
        done_stale = [key for cell in cells if cell.key(version) in finished for key in self.stale.get(cell.key(version), [])]
        if done_stale:  # left by a run killed between writing a new row and removing the old one
            store.remove(done_stale)
        self.failed_groups: dict[str, tuple[int, str]] = {}  # group -> (shortest failing seq_len, why)
        for cell in cells:
            row = stored.get(cell.key(version))
            if row is not None:
                self.note_failure(cell, str(row.get("status")))
        self.pending = [c for c in cells if c.key(version) not in finished]
        self.estimates = {c.key(version): estimate_seconds(c) for c in self.pending}
        self.remaining_estimate = sum(self.estimates.values())
        self.spent_estimate = 0.0
        self.run_time = 0.0  # wall time of the cells actually run, to rescale the remaining estimate
        self.done = 0
        self.rows: list[dict] = []
        self.stopped = threading.Event()  # set on interrupt: rows of killed cells are not stored
        self._lock = threading.Lock()

    def note_failure(self, cell: Cell, status: str) -> None:
        group = cell.group_key()
        if status in FAILED_STATUSES and (group not in self.failed_groups or cell.seq_len < self.failed_groups[group][0]):
            self.failed_groups[group] = (cell.seq_len, f"{status} at L={cell.seq_len}")

    def groups(self) -> list[list[Cell]]:
        """The pending cells by group (first-appearance order), each group in suite order (seq_len ascending)."""
        groups: dict[str, list[Cell]] = {}
        for cell in self.pending:
            groups.setdefault(cell.group_key(), []).append(cell)
        return list(groups.values())

    def run_one(self, cell: Cell, env: dict[str, str] | None = None) -> dict | None:
        """Run (or skip) one pending cell, store its row and print progress; None once stopped."""
        if self.stopped.is_set():
            return None
        key = cell.key(self.version)
        begin = time.monotonic()
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            failed = self.failed_groups.get(cell.group_key())
        if failed and cell.seq_len > failed[0] and cell.measure.get("skip_after_oom", True):
            metrics, ran = {"status": "skipped", "message": f"skipped after {failed[1]}"}, False
        else:
            self.store.mark_running(key)
            if self.options.in_process:
                metrics = measure_cell(cell, limit_memory=False)
            else:
                metrics = run_cell_isolated(cell, env) if env else run_cell_isolated(cell)
            ran = True
        if self.stopped.is_set():  # killed by the interrupt: not a result
            return None
        row = {
            **cell.to_row(),
            "run_id": self.options.run_id,
            "suite": cell.suite,
            "cell_key": key,
            "code_version": self.version,
            "started_at": stamp,
            "cell_wall_s": time.monotonic() - begin,
            **metrics,
        }
        with self._lock:
            self.note_failure(cell, metrics["status"])
            self.remaining_estimate -= self.estimates[key]
            if ran:
                self.spent_estimate += self.estimates[key]
                self.run_time += time.monotonic() - begin
            self.store.append(row)
            if self.stale.get(key):
                self.store.remove(self.stale[key])
            self.rows.append(row)
            self.done += 1
            # ETA: the remaining a-priori estimates, rescaled by how far off they have been so far.
            eta = self.remaining_estimate * (self.run_time / self.spent_estimate if self.spent_estimate else 1.0)
            self.options.print_line(_progress_line(self.done, len(self.pending), eta, row))
        return row


def run_cells(cells: list[Cell], store: RunStore, options: RunOptions) -> list[dict]:
    """Run the `cells` that `store` does not already hold (for this code version), one at a time,
    and append one row per cell; return the new rows.

    A cell already stored with status other than `error` is not run again (resume). A stored row of
    the same cell under another code version is replaced by the new row. After a cell ends `oom` or
    `timeout`, longer lengths of its group (same config but seq_len/batch) are recorded as
    `skipped` when the suite's `skip_after_oom` is on, also across a resume. harness.executors
    runs the same `Sweep` in parallel.
    """
    sweep = Sweep(cells, store, options)
    for cell in sweep.pending:
        sweep.run_one(cell)
    return sweep.rows


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
