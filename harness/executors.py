"""Executors: where the cells of a run are measured. All of them write into the same `RunStore`
(one `cells/<key>.json` per cell), so partial runs merge and `--resume` works across executors.

- `local`: one cell at a time in this process's children (`runner.run_cells`).
- `pool`: N worker slots in this process, one per visible GPU (pinned with CUDA_VISIBLE_DEVICES) or
  `--workers N` on CPU (torch threads split among them); each cell still runs in its own spawned
  process, the slots only bound concurrency.
- `submitit`: a Slurm job array through submitit (`cluster="local"` runs the same code without
  Slurm); each array task runs one group of cells and writes their rows itself; a task that is
  preempted or times out is requeued (`checkpoint`) and resumes its group from the stored rows.

Skip-after-OOM needs a group's cells (same configuration, increasing seq_len) in order, so the
unit handed out is a group: its cells run one after another in one slot / job, groups in parallel.
"""

from __future__ import annotations

import json
import os
import queue
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.results import RunStore, atomic_write_json
from harness.runner import THREADS_ENV, RunOptions, Sweep, kill_live_cells, run_cells
from harness.suite import Cell

EXECUTORS = ("local", "pool", "submitit")
JOBS_FILE = "jobs.json"  # submitted job ids, per submission, for `harness status`
SUBMITIT_DIR = "submitit"  # submitit's pickles and job logs, inside the run folder


class ExecutorError(Exception):
    """An executor that cannot run here (e.g. submitit not installed); str is a human message."""


# --------------------------------------------------------------------------- pool


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pool_slots(device: str, workers: int | None = None) -> list[dict[str, str]]:
    """The environment of each worker slot: one per visible GPU on CUDA (at most `workers`), else
    `workers` (default 1) slots with the CPU cores split among them (used when a suite sets no threads)."""
    if device.startswith("cuda"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            ids = [v.strip() for v in visible.split(",") if v.strip()]
        else:
            import torch

            ids = [str(i) for i in range(torch.cuda.device_count())]
        if not ids:
            raise ExecutorError("the pool executor found no visible GPU")
        return [{"CUDA_VISIBLE_DEVICES": i} for i in ids[: workers or len(ids)]]
    n = workers or 1
    threads = str(max(1, _cpu_count() // n))
    return [{THREADS_ENV: threads, "OMP_NUM_THREADS": threads} for _ in range(n)]


def run_pool(cells: list[Cell], store: RunStore, options: RunOptions, slots: list[dict[str, str]]) -> list[dict]:
    """Run the pending cells with one thread per slot, groups handed out as slots free up; return the new rows.

    On an interrupt the running cell processes are killed and their cells are not recorded.
    """
    if options.in_process:
        raise ExecutorError("--in-process runs cells one at a time: use --executor local")
    sweep = Sweep(cells, store, options)
    free: queue.Queue[dict[str, str]] = queue.Queue()
    for slot in slots:
        free.put(slot)

    def run_group(group: list[Cell]) -> None:
        env = free.get()
        try:
            for cell in group:
                if sweep.run_one(cell, env) is None:
                    return
        finally:
            free.put(env)

    pool = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="harness-slot")
    futures = [pool.submit(run_group, group) for group in sweep.groups()]
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            future.result()  # a bug in a slot (not a cell failure, those are rows) stops the run
    except BaseException:
        sweep.stopped.set()
        for future in futures:
            future.cancel()
        kill_live_cells()
        raise
    finally:
        pool.shutdown(wait=True)
    return sweep.rows


# --------------------------------------------------------------------------- submitit / Slurm


class GroupJob:
    """The callable of one array task: run a group's cells (each in its own spawned process) into
    the store. submitit calls `checkpoint` on preemption or timeout and requeues the task, which
    then skips the cells already stored (`run_cells` resumes)."""

    def __call__(self, root: str, suite: str, run_id: str, cells: list[Cell], code_version: str) -> list[str]:
        store = RunStore(root, suite, run_id)
        options = RunOptions(code_version=code_version, run_id=run_id)
        return [row["status"] for row in run_cells(cells, store, options)]

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue with the same arguments (the stored rows are the checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def slurm_parameters(slurm: dict[str, Any], device: str) -> dict[str, Any]:
    """submitit AutoExecutor parameters from a suite's `slurm:` block (with command-line overrides)."""
    gpus = slurm.get("gpus_per_node")
    params: dict[str, Any] = {
        "timeout_min": int(slurm.get("time_min") or 60),
        "gpus_per_node": int(gpus if gpus is not None else (1 if device.startswith("cuda") else 0)),
        "slurm_array_parallelism": int(slurm.get("array_parallelism") or 32),
        "name": "harness",
    }
    if slurm.get("cpus_per_task"):
        params["cpus_per_task"] = int(slurm["cpus_per_task"])
    if slurm.get("mem_gb"):
        params["mem_gb"] = float(slurm["mem_gb"])
    if slurm.get("partition"):
        params["slurm_partition"] = slurm["partition"]
    if slurm.get("extra"):
        params["slurm_additional_parameters"] = dict(slurm["extra"])
    return params


def _failure_row(cell: Cell, options: RunOptions, message: str) -> dict[str, Any]:
    return {
        **cell.to_row(),
        "run_id": options.run_id,
        "suite": cell.suite,
        "cell_key": cell.key(options.code_version),
        "code_version": options.code_version,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "error",
        "message": message[:4000],
    }


def _record_submission(store: RunStore, cluster: str, folder: Path, jobs: list[tuple[str, list[str]]]) -> None:
    file = store.path / JOBS_FILE
    data = json.loads(file.read_text(encoding="utf-8")) if file.exists() else {"submissions": []}
    data["submissions"].append(
        {
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cluster": cluster,
            "folder": str(folder),
            "jobs": [{"job_id": job_id, "cells": keys} for job_id, keys in jobs],
        }
    )
    atomic_write_json(file, data)


def _make_importable_in_jobs() -> None:
    """Put this checkout on PYTHONPATH, which the jobs inherit (sbatch exports the environment), so
    they can unpickle harness objects also when the project is not installed."""
    root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


def run_submitit(
    cells: list[Cell],
    store: RunStore,
    options: RunOptions,
    slurm: dict[str, Any],
    device: str,
    cluster: str | None = None,
) -> list[dict]:
    """Submit one array task per pending group, wait for them and return the new rows.

    A task that fails (killed, node lost, out of requeues) leaves each of its cells without a row
    recorded as `error` with the job's reason; results.parquet is rebuilt from the cells at the end.
    """
    try:
        import submitit
    except ImportError:
        raise ExecutorError("--executor submitit needs submitit: pip install 'reformer-harness[slurm]'") from None
    if options.in_process:
        raise ExecutorError("--in-process runs cells one at a time: use --executor local")
    sweep = Sweep(cells, store, options)  # resume state, stale rows cleaned up
    groups = sweep.groups()
    if not groups:
        return []
    _make_importable_in_jobs()
    folder = store.path / SUBMITIT_DIR
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**slurm_parameters(slurm, device))
    group_job = GroupJob()
    with executor.batch():
        jobs = [executor.submit(group_job, str(store.root), store.suite, store.run_id, group, options.code_version) for group in groups]
    _record_submission(store, executor.cluster, folder, [(str(j.job_id), [c.key(options.code_version) for c in g]) for j, g in zip(jobs, groups)])
    options.print_line(f"submitted {len(jobs)} {executor.cluster} job(s) for {len(sweep.pending)} cells; "
                       f"follow with: python -m harness status {store.path}")
    by_job = {id(job): group for job, group in zip(jobs, groups)}
    finished = 0
    poll_s = 1.0 if executor.cluster == "local" else 15.0  # spare sacct on a real cluster
    for job in submitit.helpers.as_completed(jobs, poll_frequency=poll_s):
        group = by_job[id(job)]
        try:
            statuses = job.result()
            outcome = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses)) or "nothing to run"
        except Exception as error:  # noqa: BLE001 - a failed job is data about its cells
            reason = str(error).strip().splitlines()
            outcome = f"FAILED: {reason[-1][:200] if reason else type(error).__name__}"
            stored = {r.get("cell_key") for r in store.rows()}
            for cell in group:
                if cell.key(options.code_version) not in stored:
                    store.append(_failure_row(cell, options, f"submitit job {job.job_id} failed: {error}"))
        finished += 1
        options.print_line(f"[{finished:>3}/{len(jobs)}] job {job.job_id} ({len(group)} cells): {outcome}")
    store.rebuild()  # the jobs' own rebuilds may have raced
    keys = {c.key(options.code_version) for c in sweep.pending}
    return [row for row in store.rows() if row.get("cell_key") in keys]


def run_with_executor(
    executor: str,
    cells: list[Cell],
    store: RunStore,
    options: RunOptions,
    *,
    device: str,
    workers: int | None = None,
    slurm: dict[str, Any] | None = None,
    cluster: str | None = None,
) -> list[dict]:
    """Dispatch to the executor named `executor` (one of EXECUTORS); return the new rows."""
    if executor == "local":
        return run_cells(cells, store, options)
    if executor == "pool":
        return run_pool(cells, store, options, pool_slots(device, workers))
    if executor == "submitit":
        return run_submitit(cells, store, options, slurm or {}, device, cluster)
    raise ExecutorError(f"unknown executor {executor!r}; one of: {', '.join(EXECUTORS)}")

