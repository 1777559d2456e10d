"""Executors (harness.executors) and `harness status` (harness.status).

Kept small: a spawned cell costs an interpreter start importing torch (~3 s on a busy machine), so
only four tests start real processes; the scheduling rules are checked with a stubbed cell process.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
from test_runner import ROOT, misbehaving_variants, statuses, write_suite  # noqa: F401 - a fixture, used by name

from harness import cli, executors, isolation, runner, slurm
from harness.commands.run import planned_cells
from harness.executors import pool_slots, run_pool, slurm_parameters
from harness.runner import RunOptions, run_cells
from harness.status import run_status
from harness.store.reader import load
from harness.store.writer import RunStore
from harness.suites import SuiteError, load_suite


def options(lines: list[str] | None = None) -> RunOptions:
    return RunOptions(code_version="v1", run_id="run", print_line=(lines if lines is not None else []).append)


def by_key(rows: list[dict]) -> dict[str, str]:
    return {r["cell_key"]: r["status"] for r in rows}


def test_pool_matches_local_and_a_killed_workers_cell_is_an_error(tmp_path, misbehaving_variants):
    cells = load_suite(write_suite(tmp_path, "pool", [{"name": "test_crash"}, {"name": "full"}], [64])).cells()
    local = run_cells(cells, RunStore(tmp_path / "local", "pool", "run"), options())
    store = RunStore(tmp_path / "pool", "pool", "run")
    pooled = run_pool(cells, store, options(), pool_slots("cpu", 2))
    assert by_key(pooled) == by_key(local) == {cells[0].key("v1"): "error", cells[1].key("v1"): "ok"}
    crashed = next(r for r in pooled if r["status"] == "error")
    assert "killed by signal SIGKILL" in crashed["message"]
    assert sorted(load(store.path)["cell_key"]) == sorted(by_key(local)) and not store.running()
    ok = next(r for r in pooled if r["status"] == "ok")  # its runner and the other worker's cell: the run's own load
    assert ok["run_cpu_cores"] >= 0 and ok["other_cpu_cores"] >= 0 and isinstance(ok["contended"], bool)


def test_pool_runs_groups_in_parallel_and_keeps_skip_after_oom(tmp_path, monkeypatch):
    outcomes = {64: "ok", 128: "oom", 256: "ok"}
    seen: list[tuple[str, int, dict]] = []
    lock = threading.Lock()

    def isolated(cell, root, run_id, version, env=None):
        with lock:
            seen.append((cell.label, cell.seq_len, env))
        return {"status": outcomes[cell.seq_len] if cell.variant == "full" else "ok", "message": "stub"}

    monkeypatch.setattr(runner, "execute_isolated", isolated)
    cells = load_suite(write_suite(tmp_path, "groups", [{"name": "full"}, {"name": "sdpa"}], [64, 128, 256])).cells()
    rows = run_pool(cells, RunStore(tmp_path / "out", "groups", "run"), options(), pool_slots("cpu", 2))
    assert sorted(statuses(rows)) == sorted(
        [("full", 64, "ok"), ("full", 128, "oom"), ("full", 256, "skipped"), ("sdpa", 64, "ok"), ("sdpa", 128, "ok"), ("sdpa", 256, "ok")]
    )
    assert [n for label, n, _ in seen if label == "full"] == [64, 128]  # in order, 256 never started
    assert all(env[isolation.THREADS_ENV] == str(max(1, executors.cpu_count() // 2)) for _, _, env in seen)


def test_pool_slots_pin_one_worker_per_visible_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert pool_slots("cuda") == [{"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    assert pool_slots("cuda", workers=1) == [{"CUDA_VISIBLE_DEVICES": "3"}]
    assert len(pool_slots("cpu")) == 1


def test_slurm_block_in_the_suite_and_its_submitit_parameters(tmp_path):
    path = write_suite(tmp_path, "slurm", [{"name": "full"}], [64])
    path.write_text(path.read_text() + "slurm:\n  partition: gpu\n  time_min: 30\n  extra: {account: lab}\n")
    suite = load_suite(path)
    params = slurm_parameters(suite.slurm, "cuda")
    assert params["slurm_partition"] == "gpu" and params["timeout_min"] == 30 and params["gpus_per_node"] == 1
    assert params["slurm_additional_parameters"] == {"account": "lab"} and params["slurm_array_parallelism"] == 32
    path.write_text(path.read_text() + "  nodes: 2\n")
    with pytest.raises(SuiteError, match="nodes"):
        load_suite(path)


def test_submitit_local_executor_runs_a_suite_and_status_reports_it(tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    suite = write_suite(tmp_path, "slurmish", [{"name": "full"}], [64, 128])
    out = tmp_path / "out"
    argv = ["run", str(suite), "--out", str(out), "--executor", "submitit", "--submitit-cluster", "local"]
    assert cli.main(argv) == 0
    run_dir = next((out / "slurmish").iterdir())
    rows = load(run_dir)
    assert sorted(rows["seq_len"]) == [64, 128] and set(rows["status"]) == {"ok"} and rows["cell_key"].is_unique
    jobs = json.loads((run_dir / executors.JOBS_FILE).read_text())["submissions"]
    assert jobs[0]["cluster"] == "local" and len(jobs[0]["jobs"]) == 1  # one group -> one array task
    assert sorted(jobs[0]["jobs"][0]["cells"]) == sorted(rows["cell_key"])
    capsys.readouterr()
    assert cli.main(["status", str(run_dir)]) == 0
    assert "2 cells: 2 done, 0 running, 0 failed, 0 pending" in capsys.readouterr().out


class DyingJob:
    """Stands in for executors.GroupJob: the job process is killed before it stores anything."""

    def __call__(self, *args):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_submitit_job_that_dies_leaves_its_cells_as_errors(tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    here = str(Path(__file__).resolve().parent)  # the job process unpickles DyingJob from this module
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), here, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(executors, "GroupJob", DyingJob)
    cells = load_suite(write_suite(tmp_path, "dies", [{"name": "full"}], [64])).cells()
    store = RunStore(tmp_path / "out", "dies", "run")
    rows = executors.run_submitit(cells, store, options(), {}, "cpu", cluster="local")
    assert [(r["cell_key"], r["status"]) for r in rows] == [(cells[0].key("v1"), "error")]
    assert rows[0]["message"].startswith("submitit job ") and "failed" in rows[0]["message"]
    assert len(store.rows()) == 1


def test_status_of_a_partial_run(tmp_path, capsys):
    cells = load_suite(write_suite(tmp_path, "partial", [{"name": "full"}], [64, 128, 256, 512])).cells()
    keys = [c.key("v1") for c in cells]
    store = RunStore(tmp_path / "out", "partial", "run")
    store.write_run_info({"suite": "partial", **planned_cells(cells, "v1")})
    for cell, status in zip(cells[:2], ["ok", "error"]):
        store.append({**cell.to_row(), "cell_key": cell.key("v1"), "status": status, "message": "boom" if status == "error" else ""})
    store.mark_running(keys[2])  # this process: alive
    store.mark_running(keys[3], pid=2**22 + 12345)  # a dead worker's note: pending again
    status = run_status(store.path)
    assert status.states == {keys[0]: "done", keys[1]: "failed", keys[2]: "running", keys[3]: "pending"}
    assert cli.main(["status", "run", "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "4 cells: 1 done, 1 running, 1 failed, 1 pending" in text
    assert "full L=128 B=1: boom" in text and "full L=512 B=1: not started" in text


# --------------------------------------------------------------------------- Slurm's view (harness.slurm)
# The real cluster is in test_slurm.py; these check the parsing and waiting rules on recorded output.

SCONTROL = """\
JobId=2 ArrayJobId=1 ArrayTaskId=0 ArrayTaskThrottle=1 JobName=harness JobState=RUNNING Reason=None Restarts=0 NumCPUs=1
JobId=1 ArrayJobId=1 ArrayTaskId=1-2%1 ArrayTaskThrottle=1 JobName=harness JobState=PENDING Reason=JobArrayTaskLimit Restarts=0
JobId=7 JobName=harness JobState=CANCELLED Reason=None Restarts=1 ExitCode=0:15
"""


def test_scontrol_and_sacct_output_give_each_array_task_its_state():
    jobs = slurm.parse_scontrol_jobs(SCONTROL)
    assert jobs == {
        "1_0": slurm.JobInfo("RUNNING"),
        "1_1": slurm.JobInfo("PENDING", "JobArrayTaskLimit"),
        "1_2": slurm.JobInfo("PENDING", "JobArrayTaskLimit"),
        "7": slurm.JobInfo("CANCELLED", "", 1),
    }
    assert jobs["1_1"].describe() == "PENDING (JobArrayTaskLimit)" and not jobs["1_1"].ended
    assert jobs["7"].ended and jobs["7"].describe() == "CANCELLED, requeued 1x"
    assert slurm.expand_task_ids("0,4-8:2%3") == ["0", "4", "6", "8"]
    sacct = slurm.parse_sacct_jobs("3_0|COMPLETED\n3_[1-2%1]|PENDING\n3_0.batch|COMPLETED\n4|CANCELLED by 0\n")
    assert {k: v.state for k, v in sacct.items()} == {"3_0": "COMPLETED", "3_1": "PENDING", "3_2": "PENDING", "4": "CANCELLED"}


def test_signal_delay_leaves_short_jobs_time_to_work():
    assert [executors.signal_delay_s(m) for m in (1, 2, 3, 4, 60)] == [10, 30, 60, 90, 90]
    assert slurm_parameters({"time_min": 1}, "cpu")["slurm_signal_delay_s"] == 10


class FakeJob:
    """A submitit job as wait_for_jobs sees it: an id and the folder of its result file."""

    def __init__(self, folder: Path, job_id: str):
        self.job_id = job_id
        self.paths = type("Paths", (), {"folder": folder, "result_pickle": folder / f"{job_id}_result.pkl"})()


def test_a_slurm_job_ended_without_a_result_is_given_up_at_the_second_answer(tmp_path, monkeypatch):
    done, gone, cancelled, queued = (FakeJob(tmp_path, i) for i in ("1_0", "1_1", "1_2", "1_3"))
    done.paths.result_pickle.touch()
    answers = iter(
        [
            slurm.SlurmUnavailable("controller down"),
            {"1_2": slurm.JobInfo("CANCELLED")},
            {"1_2": slurm.JobInfo("CANCELLED"), "1_3": slurm.JobInfo("PENDING")},
        ]
    )

    def job_states(ids):
        answer = next(answers, {"1_3": slurm.JobInfo("PENDING")})
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(executors, "job_states", job_states)
    over = executors.wait_for_jobs([done, gone, cancelled, queued], "slurm", poll_s=0, look_s=0)
    assert next(over) == (done, None)  # its result file
    assert next(over) == (gone, "is no longer known to Slurm")  # unknown at the 2nd and 3rd answer
    assert next(over) == (cancelled, "ended CANCELLED")  # the 1st answer (no controller) concluded nothing
    queued.paths.result_pickle.touch()
    assert next(over) == (queued, None) and next(over, None) is None


def test_pool_runs_rounds_one_after_another_and_resumes_them(tmp_path, monkeypatch):
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()

    def isolated(cell, root, run_id, version, env=None):
        with lock:
            seen.append((cell.label, cell.seq_len))
            n = seen.count((cell.label, cell.seq_len))
        return {"status": "ok", "message": "", "time_ms_samples": [float(n)], "time_ms_median": float(n), "contended": False}

    monkeypatch.setattr(runner, "execute_isolated", isolated)
    cells = load_suite(write_suite(tmp_path, "pooled", [{"name": "full"}, {"name": "sdpa"}], [64, 128], rounds=3)).cells()
    store = RunStore(tmp_path / "out", "pooled", "run")
    rows = run_pool(cells[:3], store, options(), pool_slots("cpu", 2))  # "interrupted": one cell not yet planned
    everyone = sorted((c.label, c.seq_len) for c in cells[:3])
    assert sorted(seen[:3]) == sorted(seen[3:6]) == sorted(seen[6:]) == everyone  # round r ends before round r + 1
    assert [r["round_medians_ms"] for r in rows] == [[1.0, 2.0, 3.0]] * 3

    seen.clear()
    rows = run_pool(cells, store, options(), pool_slots("cpu", 2))  # resumed with every cell
    assert seen == [("sdpa", 128)] * 3 and [r["time_ms_median"] for r in rows] == [2.0]
    assert len([r for r in store.rows() if r.get("row_type") != "round"]) == 4
