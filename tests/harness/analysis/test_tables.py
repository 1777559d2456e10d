"""harness.analysis.tables: the summary tables printed after a quality run, for both task kinds.

The rows are written by hand here, so each expected number is known without the harness.
"""

from __future__ import annotations

import pandas as pd

from harness.analysis.tables import quality_summary_tables
from harness.report.document import Table, to_text


def _eval_row(task: str, train: str, evaluated: str, bpd: float, accuracy: float | None = None) -> dict:
    row = {"row_type": "eval", "status": "ok", "task": task, "train_variant": train, "eval_variant": evaluated, "eval_bpd": bpd}
    if accuracy is not None:  # only the duplication task stores an accuracy
        row["accuracy"] = accuracy
    return row


def _curve_row(train: str, step: int, bpd: float) -> dict:
    return {
        "row_type": "curve",
        "status": "ok",
        "train_key": train,
        "train_variant": train,
        "step": step,
        "train_bpd": bpd,
        "eval_bpd": bpd,
    }


def test_text_task_rows_without_accuracy_give_the_bpd_tables():
    rows = [_eval_row("text", "LSH-2", "LSH-2", 3.8781), _curve_row("LSH-2", 0, 8.3), _curve_row("LSH-2", 40, 3.9214)]
    tables = {t.title: t for t in quality_summary_tables(rows)}
    assert list(tables) == ["final eval bits per dim", "last learning-curve point per training cell"]
    final = tables["final eval bits per dim"]
    assert "accuracy" not in final.frame and not final.index and final.frame["eval_bpd"].tolist() == [3.878]
    last = tables["last learning-curve point per training cell"]
    header, values = to_text([Table(last.frame, index=last.index)]).splitlines()  # as the run summary prints it
    point = dict(zip(header.split(), values.split()))
    assert point["train_variant"] == "LSH-2" and float(point["step"]) == 40 and float(point["train_bpd"]) == 3.921


def test_duplication_grid_is_the_mean_accuracy_per_train_and_eval_variant():
    rows = [
        _eval_row("duplication", "full", "full", 0.01, 100.0),
        _eval_row("duplication", "full", "LSH-1", 2.0, 40.0),
        _eval_row("duplication", "LSH-1", "full", 1.0, 90.0),
        _eval_row("duplication", "LSH-1", "LSH-1", 0.5, 70.0),
    ]
    tables = {t.title: t.frame for t in quality_summary_tables(rows)}
    grid = tables["accuracy (%) of the second-half predictions, trained with (rows) x evaluated with (columns)"]
    assert isinstance(grid, pd.DataFrame)
    assert grid.loc["full", "LSH-1"] == 40.0 and grid.loc["LSH-1", "full"] == 90.0
    bpd = tables["eval bits per dim, train x eval"]
    assert bpd.loc["LSH-1", "LSH-1"] == 0.5 and bpd.loc["full", "full"] == 0.01
