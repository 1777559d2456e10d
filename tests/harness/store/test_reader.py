"""harness.store.reader: loading runs, suite folders, fallbacks from a corrupt or missing parquet to the journal."""

from __future__ import annotations

import pandas as pd
import pytest

from harness.store.files import ResultsError
from harness.store.reader import latest_run, load, load_run_info
from harness.store.writer import RunStore


def row(key: str, status: str = "ok", **extra) -> dict:
    return {
        "cell_key": key,
        "status": status,
        "seq_len": 1024,
        "variant": "lsh",
        "time_ms_median": 1.5,
        "time_ms_samples": [1.0, 1.5, 2.0],
        **extra,
    }


def test_suite_folder_loads_its_latest_run(tmp_path):
    RunStore(tmp_path, "demo", "20240101T000000Z-cpu").append(row("old"))
    RunStore(tmp_path, "demo", "20240301T000000Z-cpu").append(row("new"))
    RunStore(tmp_path, "demo", "20240201T000000Z-cpu").append(row("middle"))
    assert latest_run(tmp_path, "demo").name == "20240301T000000Z-cpu"
    assert latest_run(tmp_path, "absent") is None
    assert load(tmp_path / "demo")["cell_key"].tolist() == ["new"]
    assert load("demo", root=tmp_path)["cell_key"].tolist() == ["new"]
    both = load(tmp_path / "demo" / "20240101T000000Z-cpu", tmp_path / "demo")
    assert both["cell_key"].tolist() == ["old", "new"]
    assert both["run_id"].tolist() == ["20240101T000000Z-cpu", "20240301T000000Z-cpu"]


def test_missing_folder_gives_results_error(tmp_path):
    with pytest.raises(ResultsError, match="nope"):
        load(tmp_path / "nope", root=tmp_path)
    with pytest.raises(ResultsError, match="not found"):
        load_run_info(tmp_path)


def test_corrupt_parquet_falls_back_to_cells(tmp_path):
    store = RunStore(tmp_path, "demo", "r1")
    store.append(row("aaa"))
    store.append(row("bbb"))
    (store.path / "results.parquet").write_bytes(b"not a parquet file")
    frame = load(store.path)
    assert frame["cell_key"].tolist() == ["aaa", "bbb"]
    assert frame["time_ms_samples"].tolist() == [[1.0, 1.5, 2.0]] * 2


def test_missing_parquet_falls_back_to_cells(tmp_path):
    store = RunStore(tmp_path, "demo", "r1")
    store.append(row("aaa"))
    (store.path / "results.parquet").unlink()
    assert load(store.path)["cell_key"].tolist() == ["aaa"]


def test_stale_parquet_is_superseded_by_cells(tmp_path):
    # Killed after the cell json was written but before the parquet was rewritten.
    store = RunStore(tmp_path, "demo", "r1")
    store.append(row("aaa"))
    stale = (store.path / "results.parquet").read_bytes()
    store.append(row("bbb"))
    (store.path / "results.parquet").write_bytes(stale)
    assert load(store.path)["cell_key"].tolist() == ["aaa", "bbb"]


def test_corrupt_parquet_without_cells_is_an_error(tmp_path):
    run = tmp_path / "demo" / "r1"
    run.mkdir(parents=True)
    (run / "results.parquet").write_bytes(b"garbage")
    with pytest.raises(ResultsError, match="unreadable parquet"):
        load(run)
    with pytest.raises(ResultsError, match="unreadable parquet"):
        load(run / "results.parquet")


def test_empty_run_is_an_error(tmp_path):
    store = RunStore(tmp_path, "demo", "r1")
    store.write_run_info({})
    with pytest.raises(ResultsError, match="no results yet"):
        load(store.path)


def test_load_returns_a_dataframe_of_all_suites_by_default(tmp_path):
    RunStore(tmp_path, "one", "r1").append(row("a"))
    RunStore(tmp_path, "two", "r1").append(row("b"))
    frame = load(root=tmp_path)
    assert isinstance(frame, pd.DataFrame)
    assert sorted(zip(frame["suite"], frame["cell_key"])) == [("one", "a"), ("two", "b")]
