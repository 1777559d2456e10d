"""Executors: where the cells of a run are measured. All of them write into the same `RunStore`
(one `cells/<key>.json` per cell), so partial runs merge and `--resume` works across executors.

- `local`: one cell at a time in this process's children (`runner.run_cells`).
- `pool`: N worker slots in this process, one per visible GPU (pinned with CUDA_VISIBLE_DEVICES) or
  `--workers N` on CPU (torch threads split among them); each cell still runs in its own spawned
  process, the slots only bound concurrency.
- `submitit`: a Slurm job array through submitit (`cluster="local"` runs the same code without
  Slurm); each array task runs one group of cells and writes their rows itself; a task that is
  preempted or times out is requeued (`checkpoint`) and resumes its group from the stored rows.
  The submitting command follows the jobs through their result files and Slurm's own view
  (harness.slurm: scontrol, then sacct), so a job that ends without a result (scancel, node lost,
  out of requeues) is noticed also on clusters without accounting storage.

Skip-after-OOM needs a group's cells (same configuration, increasing seq_len) in order, so the
unit handed out is a group: its cells run one after another in one slot / job, groups in parallel.
Cells measured in rounds (`measure.rounds`): `local` and `pool` run round after round over all
cells (the pool hands out round 1 by group, later rounds cell by cell, in the runner's shuffled
order, and starts round r + 1 once round r has ended); a `submitit` task runs the rounds of its own
group, interleaved within that group.
"""

from __future__ import annotations

import os
import queue
import secrets
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from harness.cells import Cell
from harness.isolation import THREADS_ENV, interrupt_guard, kill_live_cells
from harness.runner import CellRunner, RunOptions, run_cells
from harness.slurm import SlurmUnavailable, job_states
from harness.store.files import JOBS_FILE, atomic_write_json
from harness.store.reader import read_submissions
from harness.store.schema import CELL_KEY, CODE_VERSION, MESSAGE, RUN_ID, STARTED_AT, STATUS, STATUS_ERROR, SUITE
from harness.store.writer import RunStore

EXECUTORS = ("local", "pool", "submitit")
SUBMITIT_DIR = "submitit"  # submitit's pickles and job logs, inside the run folder
SLURM_POLL_ENV = "REFORMER_HARNESS_SLURM_POLL_S"  # seconds between questions to Slurm (default 15)


class ExecutorError(Exception):
    """An executor that cannot run here (e.g. submitit not installed); str is a human message."""


# --------------------------------------------------------------------------- pool


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask), else os.cpu_count()."""
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
    threads = str(max(1, cpu_count() // n))
    return [{THREADS_ENV: threads, "OMP_NUM_THREADS": threads} for _ in range(n)]


def run_pool(cells: list[Cell], store: RunStore, options: RunOptions, slots: list[dict[str, str]]) -> list[dict]:
    """Run the pending cells with one thread per slot, groups handed out as slots free up; return the new rows.

    Cells measured in rounds: all of round r (its units from `CellRunner.round_groups`) end before round
    r + 1 starts. On an interrupt the running cell processes are killed and their cells are not recorded.
    """
    if options.in_process:
        raise ExecutorError("--in-process runs cells one at a time: use --executor local")
    runner = CellRunner(cells, store, options)
    free: queue.Queue[dict[str, str]] = queue.Queue()
    for slot in slots:
        free.put(slot)

    def run_group(group: list[Cell], number: int) -> None:
        env = free.get()
        try:
            for cell in group:
                if runner.run_one(cell, env, number) is None:
                    return
        finally:
            free.put(env)

    pool = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="harness-slot")
    futures: list = []
    try:
        for number in range(1, runner.max_rounds + 1):
            futures = [pool.submit(run_group, group, number) for group in runner.round_groups(number)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()  # a bug in a slot (not a cell failure, those are rows) stops the run
            if runner.stopped.is_set():
                break
    except BaseException:
        runner.stopped.set()
        for future in futures:
            future.cancel()
        kill_live_cells()
        raise
    finally:
        pool.shutdown(wait=True)
    return runner.rows


# --------------------------------------------------------------------------- submitit / Slurm


class GroupJob:
    """The callable of one array task: run a group's cells (each in its own spawned process) into
    the store. submitit calls `checkpoint` on preemption or timeout and requeues the task, which
    then skips the cells already stored (`run_cells` resumes).

    SIGTERM (scancel, the hard time limit, a preemption's grace period) stops the task at once:
    the running cell's process is killed and nothing is recorded for it, and the task ends
    without a result, so the submitting command records the group's unfinished cells as `error`
    with Slurm's final state. (submitit itself ignores SIGTERM; the cell processes would die of
    it and be recorded as crashed, and the next cells would start until Slurm's SIGKILL.)"""

    def __call__(self, root: str, suite: str, run_id: str, cells: list[Cell], code_version: str) -> list[str]:
        store = RunStore(root, suite, run_id)
        options = RunOptions(code_version=code_version, run_id=run_id)
        with interrupt_guard():  # SIGTERM -> KeyboardInterrupt, which submitit does not turn into a result
            return [row[STATUS] for row in run_cells(cells, store, options)]

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue with the same arguments (the stored rows are the checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def signal_delay_s(time_min: int) -> int:
    """Seconds before the time limit at which Slurm is asked to warn a job (`--signal=USR2@N`; on
    the warning submitit checkpoints and requeues the job, which resumes its group).

    Slurm sends the warning at one of its time-limit checks, every 30 s, as soon as at most N + 30 s
    are left (seen on Slurm 22.05; its manual allows up to 60 s early). With submitit's N = 90, a job
    of at most two minutes is warned at its first check, 0-30 s after it starts, so it is requeued
    before doing any work until it runs out of requeues. N = 30 * time_min - 30 (10 to 90) leaves at
    least half the limit (20 s of a 1-minute limit) before the earliest warning, and 10 s or more
    after the latest for the requeue (one `scontrol requeue`; the stored rows are the checkpoint).
    """
    return min(90, max(10, 30 * time_min - 30))


def slurm_parameters(slurm: dict[str, Any], device: str) -> dict[str, Any]:
    """submitit AutoExecutor parameters from a suite's `slurm:` block (with command-line overrides)."""
    gpus = slurm.get("gpus_per_node")
    time_min = int(slurm.get("time_min") or 60)
    params: dict[str, Any] = {
        "timeout_min": time_min,
        "slurm_signal_delay_s": signal_delay_s(time_min),
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
        RUN_ID: options.run_id,
        SUITE: cell.suite,
        CELL_KEY: cell.key(options.code_version),
        CODE_VERSION: options.code_version,
        STARTED_AT: datetime.now(timezone.utc).isoformat(timespec="seconds"),
        STATUS: STATUS_ERROR,
        MESSAGE: message[:4000],
    }


def _record_submission(store: RunStore, cluster: str, folder: Path, jobs: list[tuple[str, list[str]]]) -> None:
    file = store.path / JOBS_FILE
    data = {"submissions": read_submissions(store.path)}
    data["submissions"].append(
        {
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cluster": cluster,
            "folder": str(folder),
            "jobs": [{"job_id": job_id, "cells": keys} for job_id, keys in jobs],
        }
    )
    atomic_write_json(file, data)


def submission_folder(store: RunStore) -> Path:
    """A new, empty folder `submitit/<UTC time>-<random>/` of the run for one submission's pickles
    and logs. submitit unpickles the result files it finds there: a fresh folder holds only what this
    submission's jobs write, never a file that came with the run folder (nor a link out of it)."""
    parent = store.path / SUBMITIT_DIR
    if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
        raise ExecutorError(f"{parent}: not a plain folder (a link or a file); move it away to submit jobs for this run")
    parent.mkdir(exist_ok=True)
    folder = parent / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"
    folder.mkdir()
    return folder


def _make_importable_in_jobs() -> None:
    """Put this checkout on PYTHONPATH, which the jobs inherit (sbatch exports the environment), so
    they can unpickle harness objects also when the project is not installed."""
    root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


def slurm_poll_s() -> float:
    """Seconds between questions to Slurm while waiting (REFORMER_HARNESS_SLURM_POLL_S, default 15,
    at least 0.5): result files are looked for every second, Slurm is asked only this often."""
    try:
        return max(0.5, float(os.environ.get(SLURM_POLL_ENV, "15")))
    except ValueError:
        return 15.0


def _has_result(job: Any) -> bool:
    """Whether a Slurm job has written its result file (job.result() then returns without waiting)."""
    folder = job.paths.folder
    try:
        folder.chmod(folder.stat().st_mode)  # refreshes a stale NFS attribute cache, as submitit does
    except OSError:
        pass
    return job.paths.result_pickle.exists()


def _ended_without_result(jobs: list[Any], seen_ended: dict[str, int]) -> list[tuple[Any, str]]:
    """Ask Slurm about `jobs` once; return (job, why) for those found ended (or no longer known) at
    this and the previous question and still without a result file. `seen_ended` (job id ->
    consecutive answers that found it ended) carries over between questions."""
    try:
        states = job_states([str(job.job_id) for job in jobs])
    except SlurmUnavailable:
        return []  # nothing can be concluded: keep waiting
    over = []
    for job in jobs:
        job_id = str(job.job_id)
        info = states.get(job_id)
        if info is not None and not info.ended:
            seen_ended.pop(job_id, None)
            continue
        seen_ended[job_id] = seen_ended.get(job_id, 0) + 1
        if seen_ended[job_id] >= 2 and not _has_result(job):
            over.append((job, f"ended {info.describe()}" if info is not None else "is no longer known to Slurm"))
    return over


def wait_for_jobs(jobs: list[Any], cluster: str, poll_s: float, look_s: float = 1.0) -> Iterator[tuple[Any, str | None]]:
    """Yield each job once it is over: (job, None) when it left a result (job.result() returns or
    raises without waiting), or (job, why) when Slurm says it ended without one.

    Result files are looked for every `look_s`, Slurm is asked every `poll_s`. A Slurm job counts as
    ended without a result when two answers in a row found it ended and its result file is still
    missing: the second look leaves time for a result written just before the end to show up on a
    shared file system. Other clusters (submitit's `local`) are left to submitit's own watcher.
    """
    remaining = list(jobs)
    seen_ended: dict[str, int] = {}
    next_question = time.monotonic() + poll_s
    while remaining:
        for job in list(remaining):
            if _has_result(job) if cluster == "slurm" else job.done():
                remaining.remove(job)
                yield job, None
        if cluster == "slurm" and remaining and time.monotonic() >= next_question:
            next_question = time.monotonic() + poll_s
            for job, why in _ended_without_result(remaining, seen_ended):
                remaining.remove(job)
                yield job, why
        if remaining:
            time.sleep(look_s)


def _record_unfinished(store: RunStore, options: RunOptions, group: list[Cell], message: str) -> int:
    """Store an `error` row with `message` for each cell of `group` without a row; return how many."""
    stored = {r.get(CELL_KEY) for r in store.rows()}
    missing = [cell for cell in group if cell.key(options.code_version) not in stored]
    for cell in missing:
        store.append(_failure_row(cell, options, message))
    return len(missing)


def _collect(job: Any, why: str | None, group: list[Cell], store: RunStore, options: RunOptions) -> str:
    """Take in one finished job: record its group's unfinished cells if it failed; return the outcome line."""
    if why is not None:
        n = _record_unfinished(
            store,
            options,
            group,
            f"Slurm job {job.job_id} {why} before this cell finished (no result; `--resume {options.run_id}` runs it again)",
        )
        return f"FAILED: {why}, no result; {n} unfinished cell(s) recorded as error"
    try:
        statuses = job.result()
        return ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses)) or "nothing to run"
    except Exception as error:  # noqa: BLE001 - a failed job is data about its cells
        reason = str(error).strip().splitlines()
        _record_unfinished(store, options, group, f"submitit job {job.job_id} failed: {error}")
        return f"FAILED: {reason[-1][:200] if reason else type(error).__name__}"


def run_submitit(
    cells: list[Cell],
    store: RunStore,
    options: RunOptions,
    slurm: dict[str, Any],
    device: str,
    cluster: str | None = None,
) -> list[dict]:
    """Submit one array task per pending group, wait for them and return the new rows.

    A task that fails (killed, cancelled, node lost, out of requeues) leaves each of its cells
    without a row recorded as `error` with the job's reason; results.parquet is rebuilt from the
    cells at the end. An interrupt (Ctrl-C) stops the waiting only: the jobs keep running and
    writing their rows, and `harness status` follows them.
    """
    try:
        import submitit
    except ImportError:
        raise ExecutorError("--executor submitit needs submitit: pip install 'reformer-harness[slurm]'") from None
    if options.in_process:
        raise ExecutorError("--in-process runs cells one at a time: use --executor local")
    runner = CellRunner(cells, store, options)  # resume state, stale rows cleaned up
    groups = runner.groups()
    if not groups:
        return []
    _make_importable_in_jobs()
    folder = submission_folder(store)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**slurm_parameters(slurm, device))
    group_job = GroupJob()
    with executor.batch():
        jobs = [executor.submit(group_job, str(store.root), store.suite, store.run_id, group, options.code_version) for group in groups]
    _record_submission(
        store, executor.cluster, folder, [(str(j.job_id), [c.key(options.code_version) for c in g]) for j, g in zip(jobs, groups)]
    )
    options.print_line(
        f"submitted {len(jobs)} {executor.cluster} job(s) for {len(runner.pending)} cells; "
        f"follow with: python -m harness status {store.path}"
    )
    by_job = {id(job): group for job, group in zip(jobs, groups)}
    finished = 0
    poll_s = 1.0 if executor.cluster == "local" else slurm_poll_s()
    try:
        for job, why in wait_for_jobs(jobs, executor.cluster, poll_s):
            group = by_job[id(job)]
            outcome = _collect(job, why, group, store, options)
            finished += 1
            options.print_line(f"[{finished:>3}/{len(jobs)}] job {job.job_id} ({len(group)} cells): {outcome}")
    except KeyboardInterrupt:
        if executor.cluster == "slurm":
            array_ids = sorted({str(job.job_id).split("_")[0] for job in jobs})
            options.print_line(
                f"interrupted: the Slurm job(s) keep running and store their cells in {store.path}; "
                f"follow them with `python -m harness status {store.path}`, stop them with "
                f"`scancel {' '.join(array_ids)}` (resume only once they have ended)"
            )
        raise
    store.rebuild()  # the jobs' own rebuilds may have raced
    keys = {c.key(options.code_version) for c in runner.pending}
    return [row for row in store.rows() if row.get(CELL_KEY) in keys]


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
