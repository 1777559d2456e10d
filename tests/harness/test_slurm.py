"""`--executor submitit` against a real Slurm: the single-node cluster of scripts/slurm_local.py.

Skipped where the cluster cannot start (no slurm-wlm/munge, not root). Every test submits through
the command line (`python -m harness run ... --executor submitit`) in a subprocess, like a user,
and asserts on the run folder and on Slurm's own view: squeue, `scontrol show job` and the
jobcomp/filetxt log (the cluster has no accounting storage, so no sacct). Cells are tiny; the
`test_hold` variant (tests/data/plugins) keeps a cell running while a file exists, so the tests
decide when a job may go on. The code version is pinned (other edits to the tree must not change
the cell keys between a run and its resume).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import pytest
from slurm_cluster import slurm_cluster, slurm_local  # noqa: F401 - a fixture, used by name
from test_runner import ROOT, misbehaving_variants, write_suite  # noqa: F401 - a fixture, used by name

from harness import cli, executors
from harness.environment import CODE_VERSION_ENV
from harness.status import RUNNING, run_status
from harness.store.reader import load
from harness.store.writer import RunStore
from harness.suites import load_suite
from tests.processes import default_sigint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
pytest.importorskip("submitit")


# --------------------------------------------------------------------------- Slurm's view


def squeue(cluster, job: str) -> dict[str, str]:
    """Task id ("12_0") -> state of the jobs of array `job` still in the queue."""
    answer = slurm_local.client(cluster, "squeue", "-h", "-r", "-j", job, "-o", "%i|%T")
    return dict(line.split("|", 1) for line in answer.stdout.split() if "|" in line)


def scontrol_job(cluster, job: str) -> dict[str, str]:
    """The fields of `scontrol -o show job JOB` for one job or array task ("12_0")."""
    answer = slurm_local.client(cluster, "scontrol", "-o", "show", "job", job)
    assert answer.returncode == 0, answer.stderr
    return dict(token.split("=", 1) for token in answer.stdout.splitlines()[0].split() if "=" in token)


def jobcomp(cluster, job: str) -> list[dict[str, str]]:
    """The jobcomp log's records of job `job`, or of the tasks of array job `job` (submitit submits a
    single group as a plain job, several as an array)."""
    return [r for r in slurm_local.jobcomp_records(cluster) if r.get("ArrayJobId", r["JobId"]) == job]


def stamp(value: str) -> datetime:
    return datetime.fromisoformat(value)


# --------------------------------------------------------------------------- runs


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, log: Path | None = None) -> object:
    """Poll `condition` every 0.2 s until it is truthy; fail naming `what` (and the log) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    detail = f"\n--- {log}:\n{log.read_text()}" if log is not None and log.exists() else ""
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}{detail}")


class Submission:
    """One `python -m harness run SUITE --executor submitit` subprocess (in a session of its own,
    as a terminal runs a foreground command) and the run folder it writes."""

    def __init__(self, suite: Path, out: Path, log: Path, args: list[str], cluster):
        self.out, self.log, self.cluster = out, log, cluster
        self.name = load_suite(suite).name
        command = [
            sys.executable,
            "-m",
            "harness",
            "run",
            str(suite),
            "--out",
            str(out),
            "--executor",
            "submitit",
            "--slurm-partition",
            cluster.partition,
            *args,
        ]
        env = {**os.environ, executors.SLURM_POLL_ENV: "1"}
        with open(log, "ab") as handle:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=default_sigint,
            )
        self.started = time.monotonic()

    @property
    def run_dir(self) -> Path:
        runs = list((self.out / self.name).glob("*/jobs.json"))
        return runs[0].parent if runs else self.out / self.name / "(none yet)"

    def jobs(self) -> list[dict]:
        """The submissions recorded in jobs.json (waits for the first)."""
        file = wait_until(lambda: next((self.out / self.name).glob("*/jobs.json"), None), 60, "jobs.json", self.log)
        return json.loads(Path(file).read_text())["submissions"]

    def array_id(self, submission: int = 0) -> str:
        return self.jobs()[submission]["jobs"][0]["job_id"].split("_")[0]

    def wait(self, timeout_s: float = 120) -> int:
        wait_until(lambda: self.process.poll() is not None, timeout_s, "the submitting command to end", self.log)
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def harness_run(slurm_cluster, tmp_path, monkeypatch, misbehaving_variants) -> Iterator[Callable[..., Submission]]:
    """Start submissions; afterwards kill those still running (by PID) and cancel every job left."""
    monkeypatch.setenv(CODE_VERSION_ENV, "slurm-test")
    started: list[Submission] = []

    def submit(suite: Path, *args: str, out: str = "out") -> Submission:
        submission = Submission(suite, tmp_path / out, tmp_path / f"{out}-{len(started)}.log", list(args), slurm_cluster)
        started.append(submission)
        return submission

    yield submit
    for submission in started:
        if submission.process.poll() is None:
            submission.process.kill()
            submission.process.wait()
    slurm_local.cancel_all_jobs(slurm_cluster)


def rows_by_seq_len(run_dir: Path) -> dict[int, dict]:
    """The stored rows of a run (parquet and journal, as a resume sees them) by sequence length."""
    rows = RunStore(run_dir.parent.parent, run_dir.parent.name, run_dir.name).rows()
    return {row["seq_len"]: row for row in rows}


def measured(run_dir: Path, seq_len: int) -> tuple:
    """When and how long the stored row of `seq_len` was measured: unchanged unless it ran again."""
    row = rows_by_seq_len(run_dir)[seq_len]
    return row["started_at"], row["cell_wall_s"], row["time_ms_median"]


def status_text(run_dir: Path, capsys) -> str:
    capsys.readouterr()
    assert cli.main(["status", str(run_dir)]) == 0
    return capsys.readouterr().out


def hold_suite(tmp_path: Path, name: str, seq_len: list[int], from_seq_len: int) -> tuple[Path, Path]:
    """A one-group suite of `test_hold` cells that wait while the returned file exists (created here)."""
    hold = tmp_path / f"{name}.hold"
    hold.touch()
    variant = {"name": "test_hold", "hold_file": str(hold), "from_seq_len": from_seq_len, "seconds": 150.0}
    return write_suite(tmp_path, name, [variant], seq_len, timeout_s=200.0), hold


# --------------------------------------------------------------------------- the scenarios


def test_a_suite_runs_as_a_job_array_within_its_parallelism_and_gives_the_rows_of_a_local_run(harness_run, slurm_cluster, tmp_path, capsys):
    suite = write_suite(tmp_path, "array", [{"name": "full"}, {"name": "sdpa"}, {"name": "test_crash"}], [64])
    run = harness_run(suite, "--slurm-array-parallelism", "1", "--slurm-time-min", "10")
    array_id = run.array_id()
    seen_running, seen_queued, most_at_once = set(), set(), 0
    while run.process.poll() is None and time.monotonic() - run.started < 150:
        tasks = squeue(slurm_cluster, array_id)
        most_at_once = max(most_at_once, list(tasks.values()).count("RUNNING"))
        status = run_status(run.run_dir)
        seen_running.update(status.keys(RUNNING))
        seen_queued.update(k for k, why in status.queued.items() if "PENDING (JobArrayTaskLimit)" in why)
        time.sleep(0.3)
    assert run.wait() == 0, run.output()
    elapsed = time.monotonic() - run.started

    # Slurm's view: one array of three tasks, throttled to one at a time on a node that could run more.
    assert most_at_once == 1 and not squeue(slurm_cluster, array_id)
    tasks = sorted(jobcomp(slurm_cluster, array_id), key=lambda r: stamp(r["StartTime"]))
    assert [r["JobState"] for r in tasks] == ["COMPLETED"] * 3 and {r["ArrayTaskId"] for r in tasks} == {"0", "1", "2"}
    assert all(stamp(b["StartTime"]) >= stamp(a["EndTime"]) for a, b in itertools.pairwise(tasks)), tasks
    assert {scontrol_job(slurm_cluster, f"{array_id}_{i}")["ArrayTaskThrottle"] for i in range(3)} == {"1"}
    assert slurm_cluster.cpus == 1 or scontrol_job(slurm_cluster, f"{array_id}_0")["NumCPUs"] == "1"

    # The run folder: one array task per group, the rows of a local run of the same suite.
    submission = run.jobs()
    assert len(submission) == 1 and [j["job_id"] for j in submission[0]["jobs"]] == [f"{array_id}_{i}" for i in range(3)]
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "local")]) == 0
    local = load(next((tmp_path / "local" / "array").iterdir()))
    on_slurm = load(run.run_dir)
    assert dict(zip(on_slurm["cell_key"], on_slurm["status"])) == dict(zip(local["cell_key"], local["status"]))
    assert sorted(on_slurm["status"]) == ["error", "ok", "ok"]
    assert "killed by signal SIGKILL" in on_slurm.set_index("variant")["message"]["test_crash"]

    # `harness status` followed the array: tasks queued behind the throttle, cells running, then done.
    keys = set(on_slurm["cell_key"])
    assert seen_queued and seen_queued <= keys and seen_running and seen_running <= keys
    text = status_text(run.run_dir, capsys)
    assert "3 cells: 2 done, 0 running, 1 failed, 0 pending" in text and "slurm jobs: 3 COMPLETED" in text
    print(
        f"array {array_id}: 3 tasks, at most {most_at_once} running, {elapsed:.0f} s; "
        + ", ".join(f"{r['ArrayTaskId']}: {r['StartTime'][11:]}-{r['EndTime'][11:]}" for r in tasks)
    )


def test_a_job_past_its_time_limit_is_requeued_and_resumes_its_group(harness_run, slurm_cluster, tmp_path):
    suite, hold = hold_suite(tmp_path, "requeue", [64, 128], from_seq_len=128)
    run = harness_run(suite, "--slurm-time-min", "1")
    task = run.jobs()[0]["jobs"][0]["job_id"]
    wait_until(lambda: rows_by_seq_len(run.run_dir).get(64), 90, "the L=64 cell", run.log)
    first = measured(run.run_dir, 64)
    assert scontrol_job(slurm_cluster, task)["Restarts"] == "0"  # stored by the job's first run
    requeued = wait_until(lambda: int(scontrol_job(slurm_cluster, task)["Restarts"]) >= 1, 100, "the requeue", run.log)
    requeued_after = time.monotonic() - run.started
    assert requeued and 128 not in rows_by_seq_len(run.run_dir)  # L=128 was still held at the limit
    hold.unlink()
    assert run.wait(90) == 0, run.output()

    rows = rows_by_seq_len(run.run_dir)
    assert {n: r["status"] for n, r in rows.items()} == {64: "ok", 128: "ok"}
    assert measured(run.run_dir, 64) == first  # not run again after the requeue
    job = scontrol_job(slurm_cluster, task)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1" and job["TimeLimit"] == "00:01:00"
    runs = jobcomp(slurm_cluster, task)  # jobcomp/filetxt logs a requeued run as PENDING
    assert [r["JobState"] for r in runs] == ["PENDING", "COMPLETED"], runs
    assert stamp(runs[1]["StartTime"]) > stamp(runs[0]["EndTime"])
    log = (run.run_dir / "submitit").glob(f"*/{task}_0_log.err")
    text = next(log).read_text()
    assert "Caught signal SIGUSR2" in text and "timed-out" in text  # Slurm's time-limit warning
    script = next((run.run_dir / "submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR2@10" in script and "#SBATCH --time=1" in script
    print(
        f"job {task}: first run {runs[0]['StartTime'][11:]}-{runs[0]['EndTime'][11:]} (requeue seen "
        f"{requeued_after:.0f} s after submission; limit 1 min, --signal=USR2@10), second run "
        f"{runs[1]['StartTime'][11:]}-{runs[1]['EndTime'][11:]}, done {time.monotonic() - run.started:.0f} s after submission"
    )


def test_a_cancelled_job_leaves_error_rows_and_resume_finishes_them(harness_run, slurm_cluster, tmp_path, capsys):
    suite, hold = hold_suite(tmp_path, "cancel", [64, 128, 256], from_seq_len=128)
    run = harness_run(suite, "--slurm-time-min", "10")
    task = run.jobs()[0]["jobs"][0]["job_id"]
    array_id = task.split("_")[0]
    wait_until(
        lambda: rows_by_seq_len(run.run_dir).get(64) and run_status(run.run_dir).keys(RUNNING), 90, "L=64 done and L=128 running", run.log
    )
    assert squeue(slurm_cluster, array_id) == {task: "RUNNING"}
    first = measured(run.run_dir, 64)
    cancelled_at = time.monotonic()
    assert slurm_local.client(slurm_cluster, "scancel", array_id).returncode == 0
    assert run.wait(60) == 0, run.output()  # one cell measured: not a run of errors only
    noticed_s = time.monotonic() - cancelled_at

    assert not squeue(slurm_cluster, array_id) and scontrol_job(slurm_cluster, task)["JobState"] == "CANCELLED"
    assert [r["JobState"] for r in jobcomp(slurm_cluster, array_id)] == ["CANCELLED"]
    rows = rows_by_seq_len(run.run_dir)
    assert {n: r["status"] for n, r in rows.items()} == {64: "ok", 128: "error", 256: "error"}
    for n in (128, 256):
        assert rows[n]["message"].startswith(f"Slurm job {task} ended CANCELLED before this cell finished"), rows[n]
    assert "FAILED: ended CANCELLED, no result; 2 unfinished cell(s) recorded as error" in run.output()
    text = status_text(run.run_dir, capsys)
    assert "3 cells: 1 done, 0 running, 2 failed, 0 pending" in text and f"Slurm job {task} ended CANCELLED" in text

    hold.unlink()
    resume = harness_run(suite, "--resume", run.run_dir.name, "--slurm-time-min", "10")
    assert resume.wait(90) == 0, resume.output()
    rows = rows_by_seq_len(run.run_dir)
    assert {n: r["status"] for n, r in rows.items()} == {64: "ok", 128: "ok", 256: "ok"}
    assert measured(run.run_dir, 64) == first
    submissions = resume.jobs()
    assert len(submissions) == 2 and sorted(submissions[1]["jobs"][0]["cells"]) == sorted(rows[n]["cell_key"] for n in (128, 256))
    second = resume.array_id(1)
    assert [r["JobState"] for r in jobcomp(slurm_cluster, second)] == ["COMPLETED"]
    print(
        f"job {task} cancelled; the submitter noticed in {noticed_s:.1f} s; resumed as job {submissions[1]['jobs'][0]['job_id']}, "
        f"{time.monotonic() - run.started:.0f} s in all"
    )


def test_ctrl_c_of_the_submitting_command_leaves_the_jobs_running_and_status_follows_them(harness_run, slurm_cluster, tmp_path, capsys):
    suite, hold = hold_suite(tmp_path, "interrupt", [64], from_seq_len=64)
    run = harness_run(suite, "--slurm-time-min", "10")
    task = run.jobs()[0]["jobs"][0]["job_id"]
    array_id = task.split("_")[0]
    wait_until(lambda: run_status(run.run_dir).keys(RUNNING), 60, "the cell to run", run.log)
    os.killpg(run.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert run.wait(30) == 130, run.output()
    assert "interrupted: the Slurm job(s) keep running" in run.output() and f"scancel {array_id}" in run.output()

    assert squeue(slurm_cluster, array_id) == {task: "RUNNING"}
    text = status_text(run.run_dir, capsys)
    assert "1 cells: 0 done, 1 running, 0 failed, 0 pending" in text and "slurm jobs: 1 RUNNING" in text
    assert f"(Slurm job {scontrol_job(slurm_cluster, task)['JobId']})" in text  # the running cell's job
    with capsys.disabled():
        print(f"job {task} after Ctrl-C:\n{text}")

    hold.unlink()
    wait_until(lambda: not squeue(slurm_cluster, array_id), 60, "the job to end")
    text = status_text(run.run_dir, capsys)
    assert "1 cells: 1 done, 0 running, 0 failed, 0 pending" in text and "slurm jobs: 1 COMPLETED" in text
    assert [r["JobState"] for r in jobcomp(slurm_cluster, array_id)] == ["COMPLETED"]
    assert load(run.run_dir)["status"].tolist() == ["ok"]
