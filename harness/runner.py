"""Run cells, each in a fresh spawned process, and turn every outcome into a result row.

A cell's process sets its thread count and a memory limit (CPU: an address-space limit; CUDA: the
allocator's share of the GPU when the suite sets one), builds the workload, warms up, measures
peak memory on one call, then times repeated calls. Whatever happens (OOM, exception, timeout, a
crash that kills the process) the parent records a row and goes on.
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Any, Callable, Iterator

import psutil
import torch

from harness import measure
from harness.environment import device_name
from harness.suite import Cell, estimate_seconds

if TYPE_CHECKING:  # pandas is not imported into cell processes: it would slow every start
    from harness.results import RunStore

DEFAULT_MEMORY_FRACTION = 0.75  # of total RAM, per CPU cell, when the suite sets no limit ...
AVAILABLE_MEMORY_FRACTION = 0.9  # ... and at most this much of what is available when it starts
GIB = 1024**3
MIB = 1024**2
FAILED_STATUSES = ("oom", "timeout")  # statuses after which longer lengths of a variant are skipped


@dataclass
class RunOptions:
    """How the runner treats cells: isolation, code identity, where progress lines go."""

    code_version: str
    run_id: str
    in_process: bool = False
    print_line: Callable[[str], None] = field(default=lambda line: print(line, flush=True))


# --------------------------------------------------------------------------- inside a cell


def memory_limit_bytes(cell: Cell) -> int:
    """The per-cell memory budget in bytes: the suite's `memory_limit_gib`, else 75% of RAM,
    but never more than 90% of the memory available now (so a cell cannot wake the OOM killer)."""
    gib = cell.measure.get("memory_limit_gib")
    if gib:
        return int(gib * GIB)
    memory = psutil.virtual_memory()
    return int(min(memory.total * DEFAULT_MEMORY_FRACTION, memory.available * AVAILABLE_MEMORY_FRACTION))


def _limit_address_space(limit: int) -> None:
    """Cap this process's address space at its current size plus `limit` bytes (CPU cells only).

    Beyond the cap, allocations fail with an exception (recorded as `oom`) instead of the kernel's
    OOM killer taking the machine down. An existing hard limit is kept (it cannot be raised).
    """
    current = measure.read_proc_status_kib("VmSize") * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = current + limit if hard == resource.RLIM_INFINITY else min(current + limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


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


def measure_cell(cell: Cell, limit_memory: bool = True) -> dict[str, Any]:
    """Build and measure one cell in this process; return its metric columns (status included).

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
            _limit_address_space(limit)
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
    if device.type == "cuda":
        row.update({f"nvml_after_{k}": v for k, v in measure.nvml_snapshot(device.index or 0).items()})
    return row


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


def _child(cell: Cell, connection: Any, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent handles it
    _die_with_parent(parent_pid)
    try:
        try:
            row = measure_cell(cell)
        except BaseException as error:  # noqa: BLE001 - report rather than die with a traceback
            row = {"status": "error", "message": f"{type(error).__name__}: {error}"}
        connection.send(row)
    finally:
        connection.close()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (possibly the kernel's OOM killer)" if -exitcode == signal.SIGKILL else ""
        return f"worker process killed by signal {name}{hint}"
    return f"worker process exited with code {exitcode} without a result"


def run_cell_isolated(cell: Cell) -> dict[str, Any]:
    """Measure `cell` in a fresh spawned process; timeouts and crashes become rows too.

    `timeout_s` counts from the process start (interpreter and torch import included).
    """
    context = mp.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(cell, sender, os.getpid()), daemon=True)
    process.start()
    sender.close()
    timeout = float(cell.measure.get("timeout_s") or 900)
    received = False
    try:
        if not receiver.poll(timeout):
            return {"status": "timeout", "message": f"cell did not finish within timeout_s={timeout:g}"}
        try:
            row = receiver.recv()
            received = True
            return row
        except EOFError:  # the child died before sending
            process.join(30)
            return {"status": "error", "message": _describe_exit(process.exitcode)}
    finally:
        if received:
            process.join(10)  # let a child that has sent its row exit normally
        if process.is_alive():  # timed out, hung after sending, or we are interrupted
            process.kill()
        process.join()
        receiver.close()


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


def run_cells(cells: list[Cell], store: RunStore, options: RunOptions) -> list[dict]:
    """Run the `cells` that `store` does not already hold (for this code version) and append one
    row per cell; return the new rows.

    A cell already stored with status other than `error` is not run again (resume). A stored row of
    the same cell under another code version is replaced by the new row. After a cell ends `oom` or
    `timeout`, longer lengths of its group (same config but seq_len/batch) are recorded as
    `skipped` when the suite's `skip_after_oom` is on, also across a resume.
    """
    version = options.code_version
    stored = {r["cell_key"]: r for r in store.rows() if "cell_key" in r}
    finished = store.finished_keys()
    stale = stale_keys(cells, list(stored.values()), version)
    done_stale = [key for cell in cells if cell.key(version) in finished for key in stale.get(cell.key(version), [])]
    if done_stale:  # left by a run killed between writing a new row and removing the old one
        store.remove(done_stale)

    failed_groups: dict[str, tuple[int, str]] = {}  # group -> (shortest failing seq_len, why)

    def note_failure(cell: Cell, status: str) -> None:
        group = cell.group_key()
        if status in FAILED_STATUSES and (group not in failed_groups or cell.seq_len < failed_groups[group][0]):
            failed_groups[group] = (cell.seq_len, f"{status} at L={cell.seq_len}")

    for cell in cells:
        row = stored.get(cell.key(version))
        if row is not None:
            note_failure(cell, str(row.get("status")))

    pending = [c for c in cells if c.key(version) not in finished]
    estimates = {c.key(version): estimate_seconds(c) for c in pending}
    remaining_estimate = sum(estimates.values())
    spent_estimate = 0.0
    run_time = 0.0  # wall time of the cells actually run, to rescale the remaining estimate
    rows = []
    for index, cell in enumerate(pending):
        key = cell.key(version)
        begin = time.monotonic()
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        failed = failed_groups.get(cell.group_key())
        remaining_estimate -= estimates[key]
        if failed and cell.seq_len > failed[0] and cell.measure.get("skip_after_oom", True):
            metrics = {"status": "skipped", "message": f"skipped after {failed[1]}"}
        else:
            metrics = measure_cell(cell, limit_memory=False) if options.in_process else run_cell_isolated(cell)
            spent_estimate += estimates[key]
            run_time += time.monotonic() - begin
        note_failure(cell, metrics["status"])
        row = {
            **cell.to_row(),
            "run_id": options.run_id,
            "suite": cell.suite,
            "cell_key": key,
            "code_version": version,
            "started_at": stamp,
            "cell_wall_s": time.monotonic() - begin,
            **metrics,
        }
        store.append(row)
        if stale.get(key):
            store.remove(stale[key])
        rows.append(row)
        # ETA: the remaining a-priori estimates, rescaled by how far off they have been so far.
        eta = remaining_estimate * (run_time / spent_estimate if spent_estimate else 1.0)
        options.print_line(_progress_line(index + 1, len(pending), eta, row))
    return rows


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
