"""Slurm's own view of submitted jobs, for the submitit executor and `harness status`.

submitit learns a job's state from `sacct` only. A cluster without accounting storage
(`AccountingStorageType=accounting_storage/none`: small clusters, and the single-node cluster of
scripts/slurm_local.py) answers sacct with "Slurm accounting storage is disabled", so every job
looks UNKNOWN there: a job that ended without writing its result (cancelled, killed, out of
requeues) is never seen to end, and the submitting command would wait for it forever. Here the
controller is asked first (`scontrol show job`: queued and running jobs, and ended ones for
MinJobAge, 300 s by default), then sacct for the jobs the controller no longer knows.

Job ids are submitit's: "123" for a plain job, "123_4" for task 4 of array job 123.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterable

# States after which a job does not run again by itself (a requeued job is PENDING or REQUEUED).
ENDED_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED"}
)


class SlurmUnavailable(Exception):
    """Slurm could not be asked (no scontrol, or the controller did not answer); str says why."""


@dataclass(frozen=True)
class JobInfo:
    """One job (or array task) as Slurm sees it."""

    state: str  # PENDING, RUNNING, COMPLETED, CANCELLED, TIMEOUT, ... (Slurm's JobState)
    reason: str = ""  # why a job is pending (e.g. JobArrayTaskLimit) or how it ended; "" for None
    restarts: int = 0  # how often the job was requeued

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    def describe(self) -> str:
        """e.g. "PENDING (JobArrayTaskLimit)", "CANCELLED", "RUNNING, requeued 1x"."""
        text = f"{self.state} ({self.reason})" if self.reason else self.state
        return f"{text}, requeued {self.restarts}x" if self.restarts else text


def expand_task_ids(spec: str) -> list[str]:
    """Array task ids of a Slurm range spec: "3" -> [3], "1-3%2" -> [1, 2, 3], "0,4-8:2" -> [0, 4, 6, 8]."""
    tasks: list[str] = []
    for part in spec.split("%", 1)[0].split(","):
        bounds, _, step = part.partition(":")
        low, _, high = bounds.partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (step and not step.isdigit()):
            continue
        tasks.extend(str(n) for n in range(int(low), int(high or low) + 1, int(step or 1)))
    return tasks


def parse_scontrol_jobs(text: str) -> dict[str, JobInfo]:
    """`scontrol -o show job` output (one job per line, Key=Value fields) -> job id -> JobInfo;
    array tasks under "<ArrayJobId>_<task>", a pending range once per task."""
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        fields = dict(token.split("=", 1) for token in line.split() if "=" in token)
        if "JobId" not in fields or "JobState" not in fields:
            continue
        reason = fields.get("Reason", "")
        restarts = fields.get("Restarts", "0")
        info = JobInfo(fields["JobState"], "" if reason in ("None", "(null)") else reason, int(restarts) if restarts.isdigit() else 0)
        array_id, task_spec = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
        if array_id and task_spec:
            for task in expand_task_ids(task_spec):
                jobs[f"{array_id}_{task}"] = info
        else:
            jobs[fields["JobId"]] = info
    return jobs


def parse_sacct_jobs(text: str) -> dict[str, JobInfo]:
    """`sacct -n -P -X -o JobID,State` output -> job id -> JobInfo ("CANCELLED by 0" -> CANCELLED;
    a pending range "12_[3-5%2]" once per task)."""
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        job_id, _, state = line.partition("|")
        if not job_id or not state or "." in job_id:
            continue
        info = JobInfo(state.split()[0])
        main, _, task = job_id.partition("_")
        if task.startswith("["):
            for number in expand_task_ids(task.strip("[]")):
                jobs[f"{main}_{number}"] = info
        else:
            jobs[job_id] = info
    return jobs


def _run(command: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SlurmUnavailable(f"{command[0]}: {error}") from None


def _from_controller(array_ids: set[str], timeout_s: float) -> dict[str, JobInfo]:
    if shutil.which("scontrol") is None:
        raise SlurmUnavailable("scontrol not found")
    jobs: dict[str, JobInfo] = {}
    for array_id in sorted(array_ids):
        answer = _run(["scontrol", "-o", "show", "job", array_id], timeout_s)
        if answer.returncode != 0:
            if "invalid job id" in answer.stderr.lower():
                continue  # ended longer than MinJobAge ago (or never existed)
            raise SlurmUnavailable(f"scontrol show job {array_id}: {answer.stderr.strip() or answer.returncode}")
        jobs.update(parse_scontrol_jobs(answer.stdout))
    return jobs


def _from_accounting(array_ids: set[str], timeout_s: float) -> dict[str, JobInfo]:
    """sacct's view, {} where accounting is off or sacct is missing."""
    if not array_ids or shutil.which("sacct") is None:
        return {}
    answer = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(sorted(array_ids))], timeout_s)
    return parse_sacct_jobs(answer.stdout) if answer.returncode == 0 else {}


def job_states(job_ids: Iterable[str], timeout_s: float = 30) -> dict[str, JobInfo]:
    """Slurm's view of each job id (submitit's "123" / "123_4"); ids Slurm no longer knows are left out.

    SlurmUnavailable when scontrol is missing or the controller does not answer: then nothing can
    be concluded about any job (callers keep waiting rather than call a live job dead)."""
    wanted = {str(job_id) for job_id in job_ids}
    array_ids = {re.split(r"[_.]", job_id, maxsplit=1)[0] for job_id in wanted}
    found = _from_controller(array_ids, timeout_s)
    missing = {job_id.split("_", 1)[0] for job_id in wanted - found.keys()}
    if missing:
        found = {**_from_accounting(missing, timeout_s), **found}
    return {job_id: found[job_id] for job_id in wanted if job_id in found}
