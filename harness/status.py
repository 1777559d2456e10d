"""`python -m harness status RUN`: which cells of a run are done, running, failed or pending.

Works for every executor while the run goes on or after it stopped: the planned cells come from
run.json (`cell_keys`, `cell_labels`), finished ones from the stored rows (harness.store), running ones from the
running/*.json notes the runner leaves while a cell is measured, and Slurm jobs still queued from
jobs.json (their state asked of Slurm itself, harness.slurm: scontrol, then sacct, so it works
on clusters without accounting storage too).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from harness.safe_io import terminal_text
from harness.slurm import SlurmUnavailable, job_states
from harness.store.reader import load_run_info, read_submissions
from harness.store.schema import BATCH, CELL_KEY, MESSAGE, ROUND_ROW, ROW_TYPE, SEQ_LEN, STARTED_AT, STATUS, STATUS_ERROR, VARIANT_LABEL
from harness.store.writer import RunStore

DONE, RUNNING, FAILED, PENDING, CORRUPT = "done", "running", "failed", "pending", "corrupt"


@dataclass
class RunStatus:
    """The state of every planned cell of a run (key -> state) and the details behind it."""

    path: Path
    states: dict[str, str]
    labels: dict[str, str]
    rows: dict[str, dict]
    running: dict[str, dict]
    queued: dict[str, str] = field(default_factory=dict)  # pending key -> "job <id> <STATE>"
    job_states: dict[str, str] = field(default_factory=dict)  # Slurm job id -> state

    def keys(self, state: str) -> list[str]:
        return [key for key, s in self.states.items() if s == state]

    def counts(self) -> dict[str, int]:
        return {state: len(self.keys(state)) for state in (DONE, RUNNING, FAILED, PENDING, CORRUPT)}


def _alive(note: dict) -> bool:
    """Whether the process of a running note still lives (unknowable on another host: assume so)."""
    if note.get("host") != socket.gethostname():
        return True
    try:
        return psutil.pid_exists(int(note.get("pid", -1)))
    except (TypeError, ValueError):
        return False


def _slurm_job_states(run_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(job id -> Slurm state, cell key -> job id) from jobs.json; states only for Slurm jobs that
    Slurm still knows, e.g. "PENDING (JobArrayTaskLimit)" or "COMPLETED" (else empty)."""
    submissions = read_submissions(run_dir)  # ResultsError for a malformed jobs.json
    job_of: dict[str, str] = {}
    slurm_ids: list[str] = []
    for submission in submissions:
        for job in submission.get("jobs", []):
            for key in job.get("cells", []):
                job_of[key] = str(job["job_id"])
            if submission.get("cluster") == "slurm":
                slurm_ids.append(str(job["job_id"]))
    if not slurm_ids:
        return {}, job_of
    try:
        infos = job_states(slurm_ids)
    except SlurmUnavailable:  # not on the cluster's network, controller down: fall back to rows
        return {}, job_of
    return {job_id: infos[job_id].describe() for job_id in slurm_ids if job_id in infos}, job_of


def run_status(run_dir: str | Path) -> RunStatus:
    """Classify the planned cells of the run in `run_dir`.

    done: a stored row that is not `error`; failed: an `error` row and not running again;
    running: a running note whose process lives (or another host's); corrupt: a cell file that
    cannot be read (a resume measures it again); pending: everything else.
    Runs from before run.json listed its cells count the stored rows only.
    """
    run_dir = Path(run_dir)
    info = load_run_info(run_dir)
    store = RunStore(run_dir.parent.parent, run_dir.parent.name, run_dir.name, create=False)  # reads only
    stored_rows, unreadable = store.rows(), store.corrupt_cells()
    rows = {r[CELL_KEY]: r for r in stored_rows if CELL_KEY in r}
    corrupt = {file.stem for file in unreadable}
    cell_keys = info.get("cell_keys") or [k for k, r in rows.items() if r.get(ROW_TYPE) != ROUND_ROW]  # rounds are not cells
    planned = list(cell_keys) + sorted(corrupt - set(cell_keys))
    labels = dict(info.get("cell_labels") or {})
    running = {k: n for k, n in store.running().items() if _alive(n)}
    job_states, job_of = _slurm_job_states(run_dir)
    states: dict[str, str] = {}
    queued: dict[str, str] = {}
    for key in planned:
        row = rows.get(key)
        if row is not None and row.get(STATUS) != STATUS_ERROR:
            states[key] = DONE
        elif key in running:
            states[key] = RUNNING
        elif key in corrupt:
            states[key] = CORRUPT
        elif row is not None:
            states[key] = FAILED
        else:
            states[key] = PENDING
            job = job_of.get(key)
            if job is not None and job in job_states:
                queued[key] = f"job {job} {job_states[job]}"
        if row is not None and key not in labels:
            labels[key] = f"{row.get(VARIANT_LABEL)} L={row.get(SEQ_LEN)} B={row.get(BATCH)}"
    return RunStatus(run_dir, states, labels, rows, running, queued, job_states)


def format_status(status: RunStatus, limit: int = 20) -> str:
    """Human summary: counts, then the running, failed and pending cells (at most `limit` each); the
    run's labels and messages with their control characters escaped (`terminal_text`)."""
    counts = status.counts()
    lines = [f"{status.path}", f"{len(status.states)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    done = [str(status.rows[k].get(STATUS)) for k in status.keys(DONE)]
    if done:
        lines.append("done: " + ", ".join(f"{done.count(s)} {s}" for s in dict.fromkeys(done)))

    def section(state: str, describe: Any) -> None:
        keys = status.keys(state)
        if not keys:
            return
        lines.append(f"{state}:")
        lines.extend(f"  {status.labels.get(k, k)}: {describe(k)}" for k in keys[:limit])
        if len(keys) > limit:
            lines.append(f"  ... and {len(keys) - limit} more")

    def where(key: str) -> str:
        note = status.running[key]
        job = f" (Slurm job {note['slurm_job_id']})" if note.get("slurm_job_id") else ""
        return f"on {note.get('host')} pid {note.get('pid')}{job} since {note.get(STARTED_AT)}"

    def why(key: str) -> str:
        message = str(status.rows[key].get(MESSAGE) or "").strip().splitlines()
        return message[0][:200] if message else STATUS_ERROR

    section(RUNNING, where)
    section(CORRUPT, lambda k: f"unreadable {status.path / 'cells' / (k + '.json')}; --resume measures it again")
    section(FAILED, why)
    section(PENDING, lambda k: status.queued.get(k, "not started"))
    if status.job_states:
        states = list(status.job_states.values())
        lines.append("slurm jobs: " + ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states)))
    return terminal_text("\n".join(lines))
