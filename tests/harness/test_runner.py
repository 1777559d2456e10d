"""harness.runner (with harness.isolation): one spawned process per cell, failures as rows, skips after OOM, resume, atomic files.

Cells are tiny (d_model 32, seq_len 64-128, 2 repeats); most of the time goes into starting the
cell processes (a Python interpreter importing torch, ~3 s each on a busy machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness import cli, runner
from harness.cells import benchmark
from harness.commands import run as run_command
from harness.runner import RunOptions, run_cells
from harness.store.files import PARQUET
from harness.store.reader import cell_rows, load
from harness.store.writer import RunStore
from harness.suites import load_suite
from variants import registry

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "tests" / "data" / "plugins"


def write_suite(folder: Path, name: str, variants: list[dict], seq_len: list[int], mode: str = "forward", **measure) -> Path:
    """A tiny CPU suite file; `measure` overrides the fast defaults (no re-measuring of contended
    cells: the tests share a busy machine, and the re-measuring has tests of its own)."""
    suite = {
        "name": name,
        "device": "cpu",
        "mode": mode,
        "model": {"d_model": 32, "n_heads": 2},
        "sweep": {"seq_len": seq_len, "batch": [1]},
        "variants": variants,
        "measure": {
            "warmup": 1,
            "min_repeats": 2,
            "min_time_s": 0.0,
            "max_time_s": 5.0,
            "timeout_s": 120.0,
            "contention_retries": 0,
            **measure,
        },
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


@pytest.fixture
def misbehaving_variants(monkeypatch):
    """Register the misbehaving test variants here and in every spawned cell process."""
    monkeypatch.syspath_prepend(str(PLUGINS))  # spawned children inherit sys.path
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGINS), str(ROOT), *inherited]))  # CLI subprocesses
    monkeypatch.setenv(registry.PLUGINS_ENV, "harness_test_variants")
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # forgotten after the test
    monkeypatch.delitem(sys.modules, "harness_test_variants", raising=False)
    yield
    sys.modules.pop("harness_test_variants", None)


def run(suite: Path, tmp_path: Path, version: str = "v1", in_process: bool = False, cells=None) -> tuple[RunStore, list[dict], list[str]]:
    lines: list[str] = []
    cells = load_suite(suite).cells() if cells is None else cells
    store = RunStore(tmp_path / "out", cells[0].suite, "run1")
    options = RunOptions(code_version=version, run_id="run1", in_process=in_process, print_line=lines.append)
    return store, run_cells(cells, store, options), lines


def statuses(rows: list[dict]) -> list[tuple[str, int, str]]:
    return [(r["variant_label"], r["seq_len"], r["status"]) for r in rows]


def test_the_runner_runs_every_cell_in_a_spawned_process(tmp_path, monkeypatch, capsys):
    def not_here(*args, **kwargs):
        raise AssertionError("measure_cell ran in the parent process")

    monkeypatch.setattr(benchmark, "measure_cell", not_here)  # spawned children import a fresh module
    suite = write_suite(tmp_path, "e2e", [{"name": "full"}], [64, 128])
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out")]) == 0

    rows = load(tmp_path / "out" / "e2e")
    assert sorted(rows["seq_len"]) == [64, 128]
    assert set(rows["status"]) == {"ok"}
    assert (rows["time_ms_median"] > 0).all() and (rows["n_repeats"] >= 2).all()
    assert rows["memory_limit_mib"].notna().all()  # the CPU limit is set in the cell process
    out = capsys.readouterr().out
    assert "2/2 ETA" in out and "2 cells: 2 ok" in out and "median time per call" in out


def test_crashed_cell_is_an_error_naming_the_signal_and_the_run_goes_on(tmp_path, misbehaving_variants):
    suite = write_suite(tmp_path, "crash", [{"name": "test_crash"}, {"name": "full"}], [64])
    store, rows, lines = run(suite, tmp_path)
    assert statuses(rows) == [("test_crash", 64, "error"), ("full", 64, "ok")]
    assert "killed by signal SIGKILL" in rows[0]["message"]
    assert len(store.rows()) == 2 and len(lines) == 2 and "ERROR" in lines[0]


def test_oom_under_memory_limit_then_longer_lengths_are_skipped(tmp_path):
    # Full attention materialises [batch, heads, L, L] float32 logits: 512 MiB at L=8192.
    suite = write_suite(tmp_path, "oom", [{"name": "full"}], [8192, 16384], memory_limit_gib=0.25)
    _, rows, _ = run(suite, tmp_path)
    assert statuses(rows) == [("full", 8192, "oom"), ("full", 16384, "skipped")]
    # Killed by the parent's watch on resident memory, with the peak it saw (above the 256 MiB limit).
    assert "resident memory" in rows[0]["message"] and "memory limit 0.25 GiB" in rows[0]["message"]
    assert rows[0]["memory_limit_mib"] == 256 and 256 < rows[0]["rss_peak_mib"] < 512 + 256
    assert rows[1]["message"] == "skipped after oom at L=8192"


def test_the_memory_limit_is_resident_memory_not_address_space(tmp_path):
    """An LSH cell whose measured peak is ~50-120 MiB fits a 0.25 GiB limit (with an address-space
    limit it was `oom`: threads and arenas reserve far more address space than they touch)."""
    suite = write_suite(
        tmp_path, "lsh", [{"name": "lsh", "n_hashes": 2, "bucket_size": 64}], [4096], mode="forward_backward", memory_limit_gib=0.25
    )
    _, rows, _ = run(suite, tmp_path)
    assert statuses(rows) == [("lsh", 4096, "ok")], rows[0].get("message")
    assert 0 < rows[0]["peak_mem_mib"] < 256


def test_an_allocation_beyond_the_address_space_backstop_fails_at_once(tmp_path):
    # [1, 2, 65536, 65536] float32 logits are 32 GiB: far beyond 2 x 0.25 GiB + 2 GiB of address space.
    suite = write_suite(tmp_path, "huge", [{"name": "full"}], [65536], memory_limit_gib=0.25)
    _, rows, _ = run(suite, tmp_path)
    assert statuses(rows) == [("full", 65536, "oom")]
    assert "memory limit 0.25 GiB" in rows[0]["message"] and "resident memory" not in rows[0]["message"]


def test_timeout_is_recorded_and_longer_lengths_are_skipped(tmp_path, misbehaving_variants):
    suite = write_suite(tmp_path, "slow", [{"name": "test_sleep", "seconds": 60.0}], [64, 128], timeout_s=2.0)
    begin = time.monotonic()
    _, rows, _ = run(suite, tmp_path)
    assert statuses(rows) == [("test_sleep", 64, "timeout"), ("test_sleep", 128, "skipped")]
    assert "timeout_s=2" in rows[0]["message"]
    assert time.monotonic() - begin < 30


def fake_outcomes(monkeypatch, outcomes: dict[int, str]) -> list[int]:
    """Replace the cell process by a stub returning the status given per seq_len; returns the calls."""
    calls: list[int] = []

    def isolated(cell, root, run_id, version, env=None):
        calls.append(cell.seq_len)
        return {"status": outcomes[cell.seq_len], "message": "stub"}

    monkeypatch.setattr(runner, "execute_isolated", isolated)
    return calls


def test_skip_after_oom_is_configurable_and_holds_across_a_resume(tmp_path, monkeypatch):
    calls = fake_outcomes(monkeypatch, {64: "ok", 128: "oom", 256: "oom", 512: "ok"})
    cells = load_suite(write_suite(tmp_path, "skip", [{"name": "full"}], [64, 128, 256, 512])).cells()
    run(None, tmp_path, cells=cells[:2])  # interrupted right after the OOM at 128
    _, rows, _ = run(None, tmp_path, cells=cells)  # resumed
    assert calls == [64, 128]
    assert statuses(rows) == [("full", 256, "skipped"), ("full", 512, "skipped")]

    calls.clear()
    cells = load_suite(write_suite(tmp_path, "noskip", [{"name": "full"}], [64, 128, 256, 512], skip_after_oom=False)).cells()
    _, rows, _ = run(None, tmp_path, cells=cells)
    assert calls == [64, 128, 256, 512]
    assert [r["status"] for r in rows] == ["ok", "oom", "oom", "ok"]


def test_resume_replaces_rows_of_an_older_code_version(tmp_path):
    suite = write_suite(tmp_path, "versions", [{"name": "full"}], [64, 128])
    cells = load_suite(suite).cells()
    store, _, _ = run(suite, tmp_path, version="v1", in_process=True)
    old_row = store.rows()[0]
    store, rows, _ = run(suite, tmp_path, version="v2", in_process=True)
    assert len(rows) == 2
    stored = load(store.path)
    assert sorted(stored["cell_key"]) == sorted(c.key("v2") for c in cells)
    assert set(stored["code_version"]) == {"v2"}

    # A run killed between writing the new row and removing the old one leaves both; a resume cleans up.
    store.append(old_row)
    _, rows, _ = run(suite, tmp_path, version="v2", in_process=True)
    assert rows == [] and sorted(r["cell_key"] for r in store.rows()) == sorted(c.key("v2") for c in cells)
    assert set(pd.read_parquet(store.path / PARQUET)["code_version"]) == {"v2"}


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def test_killed_run_leaves_readable_results_and_resume_runs_only_the_rest(tmp_path, monkeypatch, capsys, misbehaving_variants):
    # In-process cells keep this test to one interpreter start; the second cell sleeps so the
    # SIGKILL lands while it runs, after the first cell's files are written.
    suite = write_suite(tmp_path, "killed", [{"name": "full"}, {"name": "test_sleep", "seconds": 2.0}], [64])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "harness", "run", str(suite), "--out", str(out), "--in-process"]
    parent = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cells_dir = lambda: next(out.glob("killed/*/cells"), None)  # noqa: E731
        wait_for(lambda: cells_dir() is not None and any(cells_dir().glob("*.json")) and (cells_dir().parent / PARQUET).exists())
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()

    run_dir = cells_dir().parent
    finished = [json.loads(p.read_text()) for p in cells_dir().glob("*.json")]  # each file complete
    assert [(r["variant"], r["status"]) for r in finished] == [("full", "ok")]
    parquet = pd.read_parquet(run_dir / PARQUET)
    assert list(parquet["cell_key"]) == [finished[0]["cell_key"]]
    assert not list(run_dir.rglob("*.tmp"))

    # Resume with the same code version (other edits to the tree must not change it mid-test).
    monkeypatch.setattr(run_command, "code_version", lambda root: finished[0]["code_version"])
    assert cli.main(["run", str(suite), "--out", str(out), "--resume", run_dir.name, "--in-process"]) == 0
    assert "1 of 2 cells already done" in capsys.readouterr().out
    rows = load(run_dir)
    assert sorted(rows["variant"]) == ["full", "test_sleep"] and rows["cell_key"].is_unique
    assert set(rows["status"]) == {"ok"}
    assert rows.set_index("cell_key").loc[finished[0]["cell_key"], "started_at"] == finished[0]["started_at"]


def test_matmul_rate_gives_each_cell_its_compute_floor(tmp_path):
    suite = write_suite(tmp_path, "floor", [{"name": "full"}], [64], mode="forward_backward", matmul_rate=True)
    store, _rows, _lines = run(suite, tmp_path)  # a spawned cell process measures the rate itself
    row = load(store.path).iloc[0]
    assert row["status"] == "ok" and row["message"] == ""
    assert 0.1 < row["matmul_gflops"] < 10_000 and row["matmul_n"] in (256, 512, 1024, 2048)
    # the definitions, from the row's own columns
    assert row["floor_s"] == pytest.approx(row["flops"] / (row["matmul_gflops"] * 1e9), rel=1e-12)
    assert row["floor_ratio"] == pytest.approx(row["time_ms_median"] / 1e3 / row["floor_s"], rel=1e-12)
    assert row["floor_ratio"] == pytest.approx(row["time_ms_median"] / 1e3 * row["matmul_gflops"] * 1e9 / row["flops"])
    assert row["floor_ratio"] > 1  # nothing beats the matmul rate on its FLOPs by much, least of all a tiny layer


# --------------------------------------------------------------------------- rounds


def fake_rounds(monkeypatch, fail: dict[tuple[int, int], str] | None = None) -> list[tuple[str, int]]:
    """Replace the cell process by a stub whose n-th measurement of a cell takes 10 * n ms + seq_len/64
    (so rounds drift), or ends with the status `fail[(seq_len, n)]`; returns the calls (label, seq_len)."""
    calls: list[tuple[str, int]] = []

    def isolated(cell, root, run_id, version, env=None):
        calls.append((cell.label, cell.seq_len))
        n = calls.count((cell.label, cell.seq_len))
        if (cell.seq_len, n) in (fail or {}):
            return {"status": fail[(cell.seq_len, n)], "message": "stub"}
        median = 10.0 * n + cell.seq_len / 64
        return {
            "status": "ok",
            "message": "",
            "time_ms_samples": [median - 1, median, median + 1],
            "time_ms_median": median,
            "cpu_share_samples": [1.0, 0.5, 1.0],
            "cpu_share": 1.0,
            "peak_mem_mib": 5.0,
            "contended": n == 2 and cell.seq_len == 128,
            "contention": "CPU share 0.50 < 0.85" if n == 2 and cell.seq_len == 128 else "",
            "contention_retries_used": 2 if n == 2 and cell.seq_len == 128 else 0,
        }

    monkeypatch.setattr(runner, "execute_isolated", isolated)
    return calls


def test_rounds_interleave_the_cells_and_combine_each_cells_rounds(tmp_path, monkeypatch):
    calls = fake_rounds(monkeypatch)
    cells = load_suite(write_suite(tmp_path, "rounds", [{"name": "full"}, {"name": "sdpa"}], [64, 128], rounds=3, rounds_seed=7)).cells()
    store, rows, lines = run(None, tmp_path, cells=cells)
    suite_order = [(c.label, c.seq_len) for c in cells]
    assert calls[:4] == suite_order  # round 1 in suite order, then every cell again, shuffled, twice
    assert sorted(calls[4:8]) == sorted(calls[8:]) == sorted(suite_order) and calls[4:8] != calls[8:]
    assert len(lines) == 12 and "r1/3" in lines[0] and "r3/3" in lines[-1] and "drift" in lines[-1]

    stored = load(store.path)
    rounds = stored[stored["row_type"] == "round"]
    assert len(rounds) == 12 and sorted(set(rounds["round"])) == [1, 2, 3]
    assert set(rounds["cell_key"]) == {f"{c.key('v1')}-r{n}" for c in cells for n in (1, 2, 3)}
    own = cell_rows(stored).set_index("cell_key")
    assert len(rows) == len(own) == 4 and set(own.index) == {c.key("v1") for c in cells}
    full_128 = own.loc[cells[1].key("v1")]
    assert full_128["round_medians_ms"] == [12.0, 22.0, 32.0] and full_128["time_ms_median"] == 22.0  # median over rounds
    assert full_128["round_drift"] == pytest.approx(32 / 12 - 1) and full_128["rounds"] == 3
    assert full_128["time_ms_samples"] == [11.0, 12.0, 13.0, 21.0, 22.0, 23.0, 31.0, 32.0, 33.0] and full_128["n_repeats"] == 9
    assert full_128["contended"] and full_128["contention"] == "round 2: CPU share 0.50 < 0.85"
    assert full_128["contention_retries_used"] == 2 and len(full_128["cpu_share_samples"]) == 9
    assert not own.loc[cells[0].key("v1"), "contended"]
    assert not store.running()

    # the same seed, the same order: a second run of the same cells measures them in the same rounds order
    calls.clear()
    run(None, tmp_path / "again", cells=cells)
    assert calls[4:] == [*_previous_order(cells, 7)]


def _previous_order(cells, seed):
    """Rounds 2 and 3 as the runner orders them (harness.runner.CellRunner.round_cells)."""
    import random

    out = []
    for number in (2, 3):
        keys = [c.key("v1") for c in cells]
        random.Random(f"{seed}:{number}").shuffle(keys)
        by_key = {c.key("v1"): c for c in cells}
        out += [(by_key[k].label, by_key[k].seq_len) for k in keys]
    return out


def test_rounds_resume_and_a_failed_round_ends_its_cell(tmp_path, monkeypatch):
    calls = fake_rounds(monkeypatch, fail={(128, 1): "oom", (64, 3): "error"})
    cells = load_suite(write_suite(tmp_path, "resume", [{"name": "full"}], [64, 128, 256], rounds=3)).cells()
    store, rows, _ = run(None, tmp_path, cells=cells)
    assert [(r["seq_len"], r["status"]) for r in rows] == [(128, "oom"), (256, "skipped"), (64, "error")]  # skip-after-OOM in round 1
    assert calls == [("full", 64), ("full", 128), ("full", 64), ("full", 64)]
    assert rows[0]["message"] == "round 1 of 3: stub" and rows[2]["message"] == "round 3 of 3: stub"

    calls.clear()  # the resume measures only the round that failed with an error
    _, rows, _ = run(None, tmp_path, cells=cells)
    assert calls == [("full", 64)]
    assert [(r["seq_len"], r["status"], r["rounds"]) for r in rows] == [(64, "ok", 3)]
    assert rows[0]["round_medians_ms"] == [11.0, 21.0, 11.0]  # rounds 1 and 2 stored, round 3 again (the stub's 1st call now)
    assert len(cell_rows(load(store.path))) == 3


def test_a_run_killed_between_its_last_round_and_the_cells_row_is_finished_on_resume(tmp_path, monkeypatch):
    calls = fake_rounds(monkeypatch)
    cells = load_suite(write_suite(tmp_path, "killed", [{"name": "full"}], [64], rounds=2)).cells()
    store, _, _ = run(None, tmp_path, cells=cells)
    store.remove([cells[0].key("v1")])  # as if killed right after storing round 2
    calls.clear()
    _, rows, _ = run(None, tmp_path, cells=cells)
    assert calls == [] and [r["round_medians_ms"] for r in rows] == [[11.0, 21.0]]


def test_run_summary_counts_contended_cells(capsys):
    rows = pd.DataFrame(
        [
            {
                "variant_label": "full",
                "seq_len": 64,
                "batch": 1,
                "status": "ok",
                "time_ms_median": 2.0,
                "peak_mem_mib": 1.0,
                "contended": True,
            }
            | {"contention": "CPU share 0.51 < 0.85; other processes 1.0 cores busy", "contention_retries_used": 2},
            {
                "variant_label": "full",
                "seq_len": 128,
                "batch": 1,
                "status": "ok",
                "time_ms_median": 4.0,
                "peak_mem_mib": 2.0,
                "contended": False,
            },
            {
                "variant_label": "full",
                "seq_len": 64,
                "batch": 1,
                "status": "ok",
                "row_type": "round",
                "cell_key": "x-r1",
                "contended": True,
            },
        ]
    )
    run_command.print_summary("benchmark", rows, "tiny", Path("results/tiny/run"))
    out = capsys.readouterr().out
    assert "2 cells: 2 ok" in out and "1 of 2 cells contended" in out
    assert "full L=64 B=1: CPU share 0.51 < 0.85; other processes 1.0 cores busy (re-measured 2x)" in out
    assert "2*" in out and "*: contended" in out  # the time table marks it
