"""harness.runner_checks.runner_checks: an oom row from the cell process, the pool executor's slots, a
suite end to end with its report."""

from __future__ import annotations

import os

import pandas as pd

from harness.selfcheck import runner_checks


def test_oom_check_gets_an_oom_row_from_the_cell_process(cpu_context):
    outcome = runner_checks.check_oom(cpu_context)
    assert outcome.status == "PASS", outcome.detail
    assert outcome.data["row"]["status"] == "oom" and outcome.data["row"]["memory_limit_mib"] == 256.0


def test_pool_check_runs_two_cells_each_with_its_slots_thread_share(cpu_context):
    outcome = runner_checks.check_pool(cpu_context)
    assert outcome.status == "PASS", outcome.detail
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert [row["threads"] for row in outcome.data["rows"]] == [share, share]


def test_suite_check_runs_a_suite_end_to_end_and_renders_its_report(cpu_context, tmp_path):
    outcome = runner_checks.check_suite(cpu_context)
    assert outcome.status == "PASS", outcome.detail
    (run,) = (tmp_path / "suite" / "results" / "selfcheck_suite").iterdir()
    rows = pd.read_parquet(run / "results.parquet")
    assert sorted(rows["seq_len"]) == [64, 128] and set(rows["status"]) == {"ok"}
    report = tmp_path / "suite" / "report"
    assert (report / "report.md").is_file() and (report / "index.html").is_file() and list(report.glob("*.png"))
