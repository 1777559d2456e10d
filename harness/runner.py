"""Run cells, each in a fresh spawned process, and turn every outcome into a result row.

A cell's process sets its thread count and (on CPU) an address-space limit, builds the workload,
warms up, measures peak memory on one call, then times repeated calls. Whatever happens (OOM,
exception, timeout, a crash that kills the process) the parent records a row and goes on.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import resource
import signal
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable

import psutil
import torch

from harness import measure
from harness.environment import device_name
from harness.results import RunStore
from harness.suite import Cell, estimate_seconds

DEFAULT_MEMORY_FRACTION = 0.75  # of total RAM, per CPU cell, when the suite sets no limit
GIB = 1024**3


@dataclass
class RunOptions:
    """How the runner treats cells: isolation, limits, what to skip."""

    code_version: str
    run_id: str
    in_process: bool = False
    print_line: Callable[[str], None] = field(default=lambda line: print(line, flush=True))


def memory_limit_bytes(cell: Cell) -> int:
    """The per-cell memory budget in bytes: the suite's `memory_limit_gib`, else 75% of RAM."""
    gib = cell.measure.get("memory_limit_gib")
    return int(gib * GIB) if gib else int(psutil.virtual_memory().total * DEFAULT_MEMORY_FRACTION)


def _limit_address_space(limit: int) -> None:
    """Cap this process's address space at its current size plus `limit` bytes (CPU cells only).

    Beyond the cap, allocations fail with an exception (recorded as `oom`) instead of the kernel's
    OOM killer taking the machine down.
    """
    current = measure.read_proc_status_kib("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (current + limit, resource.RLIM_INFINITY))


def measure_cell(cell: Cell, limit_memory: bool = True) -> dict[str, Any]:
    """Build and measure one cell in this process; return its metric columns (status included)."""
    from harness.workloads import build_workload  # imports torch-heavy variants lazily

    device = torch.device(cell.device)
    threads = measure.set_cpu_threads(cell.measure.get("threads"))
    row: dict[str, Any] = {"threads": threads, "device_name": device_name(cell.device)}
    if device.type == "cuda":
        row.update({f"nvml_before_{k}": v for k, v in measure.nvml_snapshot(device.index or 0).items()})
    elif limit_memory:
        _limit_address_space(memory_limit_bytes(cell))
    try:
        workload = build_workload(cell, device)
        settings = measure.TimingSettings(
            **{k: cell.measure[k] for k in ("warmup", "min_repeats", "min_time_s", "max_repeats", "max_time_s", "flush_l2")}
        )
        for _ in range(settings.warmup):
            workload.step()
        memory = measure.measure_peak_memory(workload.step, device)
        timing = measure.time_callable(workload.step, device, replace(settings, warmup=0))
    except BaseException as error:  # noqa: BLE001 - every failure becomes data
        status = "oom" if measure.is_oom_error(error) else "error"
        message = f"{type(error).__name__}: {error}"
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


def _child(cell: Cell, connection: Any) -> None:
    try:
        connection.send(measure_cell(cell))
    finally:
        connection.close()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"worker process killed by signal {signal.Signals(-exitcode).name}"
    return f"worker process exited with code {exitcode} without a result"


def run_cell_isolated(cell: Cell) -> dict[str, Any]:
    """Measure `cell` in a fresh spawned process; timeouts and crashes become rows too."""
    context = mp.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(cell, sender), daemon=True)
    process.start()
    sender.close()
    timeout = float(cell.measure.get("timeout_s") or 900)
    try:
        if receiver.poll(timeout):
            try:
                return receiver.recv()
            except EOFError:
                pass  # the child died before sending
        else:
            process.kill()
            process.join()
            return {"status": "timeout", "message": f"cell did not finish within timeout_s={timeout:g}"}
        process.join(30)
        return {"status": "error", "message": _describe_exit(process.exitcode)}
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receiver.close()


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _progress_line(done: int, total: int, eta_s: float, row: dict[str, Any]) -> str:
    width = 20
    filled = int(width * done / max(total, 1))
    bar = "#" * filled + "-" * (width - filled)
    what = f"{row['variant_label']:<24} L={row['seq_len']:<6} B={row['batch']:<4}"
    if row["status"] == "ok":
        spread = 100 * row["time_ms_iqr"] / row["time_ms_median"] if row["time_ms_median"] else 0.0
        noisy = " NOISY" if row.get("time_noisy") else ""
        result = f"ok  {row['time_ms_median']:10.2f} ms (IQR {spread:4.1f}%{noisy})  {row['peak_mem_mib']:9.1f} MiB"
    else:
        result = f"{row['status'].upper()}  {str(row.get('message', '')).splitlines()[0][:70] if row.get('message') else ''}"
    return f"[{bar}] {done:>3}/{total} ETA {_format_eta(eta_s):>7} | {what} {result}"


def run_cells(cells: list[Cell], store: RunStore, options: RunOptions, finished: set[str] = frozenset()) -> list[dict]:
    """Run `cells` in order (skipping keys in `finished`), appending one row per cell to `store`.

    After a cell of a group (same config but seq_len/batch) ends `oom` or `timeout`, the group's
    remaining cells are recorded as `skipped` when the suite's `skip_after_oom` is on.
    """
    pending = [c for c in cells if c.key(options.code_version) not in finished]
    failed_groups: dict[str, str] = {}
    rows = []
    estimates = [estimate_seconds(c) for c in pending]
    started = time.monotonic()
    spent_estimate = 0.0
    for index, cell in enumerate(pending):
        begin = time.monotonic()
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        group = cell.group_key()
        if group in failed_groups and cell.measure.get("skip_after_oom", True):
            metrics = {"status": "skipped", "message": f"skipped after {failed_groups[group]} at a shorter length"}
        elif options.in_process:
            metrics = measure_cell(cell, limit_memory=False)
        else:
            metrics = run_cell_isolated(cell)
        if metrics["status"] in ("oom", "timeout"):
            failed_groups.setdefault(group, f"{metrics['status']} (L={cell.seq_len})")
        row = {
            **cell.to_row(),
            "run_id": options.run_id,
            "suite": cell.suite,
            "cell_key": cell.key(options.code_version),
            "code_version": options.code_version,
            "started_at": stamp,
            "cell_wall_s": time.monotonic() - begin,
            **metrics,
        }
        store.append(row)
        rows.append(row)
        # ETA: remaining a-priori estimates, rescaled by how far off they have been so far.
        spent_estimate += estimates[index]
        elapsed = time.monotonic() - started
        remaining = sum(estimates[index + 1 :]) * (elapsed / spent_estimate if spent_estimate else 1.0)
        options.print_line(_progress_line(index + 1, len(pending), remaining, row))
    return rows


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"received signal {signal.Signals(signum).name}")


def interrupt_guard() -> None:
    """Turn SIGTERM into KeyboardInterrupt so a terminated run stops between cells cleanly."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
