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

from harness import cli, executors, runner
from harness.executors import pool_slots, run_pool, slurm_parameters
from harness.results import RunStore, load
from harness.runner import RunOptions, run_cells
from harness.status import run_status
from harness.suite import SuiteError, load_suite
from test_runner import ROOT, misbehaving_variants, statuses, write_suite  # noqa: F401 - a fixture, used by name


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


def test_pool_runs_groups_in_parallel_and_keeps_skip_after_oom(tmp_path, monkeypatch):
    outcomes = {64: "ok", 128: "oom", 256: "ok"}
    seen: list[tuple[str, int, dict]] = []
    lock = threading.Lock()

    def isolated(cell, env=None):
        with lock:
            seen.append((cell.label, cell.seq_len, env))
        return {"status": outcomes[cell.seq_len] if cell.variant == "full" else "ok", "message": "stub"}

    monkeypatch.setattr(runner, "run_cell_isolated", isolated)
    cells = load_suite(write_suite(tmp_path, "groups", [{"name": "full"}, {"name": "sdpa"}], [64, 128, 256])).cells()
    rows = run_pool(cells, RunStore(tmp_path / "out", "groups", "run"), options(), pool_slots("cpu", 2))
    assert sorted(statuses(rows)) == sorted([("full", 64, "ok"), ("full", 128, "oom"), ("full", 256, "skipped"),
                                             ("sdpa", 64, "ok"), ("sdpa", 128, "ok"), ("sdpa", 256, "ok")])
    assert [n for label, n, _ in seen if label == "full"] == [64, 128]  # in order, 256 never started
    assert all(env[runner.THREADS_ENV] == str(max(1, executors._cpu_count() // 2)) for _, _, env in seen)


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
    store.write_run_info({"suite": "partial", **cli._planned_cells(cells, "v1")})
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
