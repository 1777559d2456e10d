"""harness.store.writer: the run store (journal, fold, run.json, lock), run ids and resume."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from harness.store.files import CorruptCellWarning, ResultsError, RunLockedError
from harness.store.reader import load, load_run_info
from harness.store.writer import RunStore, check_run_id, new_run_id, resume_store


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


def test_new_run_id_format_and_uniqueness(tmp_path):
    run_id = new_run_id("NVIDIA H100 80GB")
    assert re.fullmatch(r"\d{8}T\d{6}Z-NVIDIA-H100-80GB", run_id)
    (tmp_path / run_id).mkdir()
    second = new_run_id("NVIDIA H100 80GB", parent=tmp_path)
    if second[:16] == run_id[:16]:  # same second: must not reuse the folder
        assert second == f"{run_id}-2"
    assert (tmp_path / second).is_dir()  # reserved: created by new_run_id itself


def test_new_run_id_is_atomic_across_processes(tmp_path):
    """Concurrent starts (a check-then-mkdir race gave 6 starts 5 ids) each reserve their own folder."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(6) as pool:
        ids = pool.starmap(new_run_id, [("cpu", tmp_path)] * 6)
    assert len(set(ids)) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ids)


def test_append_and_load_round_trip(tmp_path):
    store = RunStore(tmp_path, "demo", "20240101T000000Z-cpu")
    store.write_run_info({"command": "python -m harness run demo.yaml"})
    store.append(row("aaa"))
    store.append(row("bbb", status="oom", time_ms_samples=[], time_ms_median=None))
    store.update_run_info(finished_at="now")

    assert sorted(p.name for p in store.path.iterdir() if not p.name.startswith(".")) == ["cells", "results.parquet", "run.json"]
    assert load_run_info(store.path) == {"command": "python -m harness run demo.yaml", "finished_at": "now"}
    frame = load(store.path)
    assert list(frame["cell_key"]) == ["aaa", "bbb"]
    assert frame["time_ms_samples"].tolist() == [[1.0, 1.5, 2.0], []]
    assert set(frame["run_id"]) == {"20240101T000000Z-cpu"} and set(frame["suite"]) == {"demo"}
    # the same rows through the parquet file itself and through the run id
    assert load(store.path / "results.parquet")["time_ms_samples"].tolist() == [[1.0, 1.5, 2.0], []]
    assert list(load("20240101T000000Z-cpu", root=tmp_path)["cell_key"]) == ["aaa", "bbb"]


def test_append_replaces_a_row_of_the_same_key(tmp_path):
    store = RunStore(tmp_path, "demo", "r1")
    store.append(row("aaa", status="error"))
    store.append(row("aaa", status="ok"))
    assert [r["status"] for r in store.rows()] == ["ok"]
    assert load(store.path)["status"].tolist() == ["ok"]


def test_mixed_type_columns_still_write(tmp_path):
    store = RunStore(tmp_path, "demo", "r1")
    store.append(row("aaa", extra=3))
    store.append(row("bbb", extra="three"))
    assert len(load(store.path)) == 2


def test_finished_keys_excludes_errors(tmp_path):
    store = RunStore(tmp_path, "demo", "r1")
    for key, status in [("a", "ok"), ("b", "error"), ("c", "oom"), ("d", "skipped"), ("e", "timeout")]:
        store.append(row(key, status=status))
    assert store.finished_keys() == {"a", "c", "d", "e"}
    assert RunStore(tmp_path, "demo", "r1").finished_keys() == {"a", "c", "d", "e"}  # reopened


def test_run_info_updates_from_many_threads_lose_nothing(tmp_path):
    """run.json is read-modify-written under its own lock: concurrent updaters all land."""
    from concurrent.futures import ThreadPoolExecutor

    store = RunStore(tmp_path, "demo", "r1")
    store.write_run_info({"suite": "demo"})
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.update_run_info(**{f"field_{i}": i}), range(40)))
    info = load_run_info(store.path)
    assert {k: v for k, v in info.items() if k.startswith("field_")} == {f"field_{i}": i for i in range(40)}


@pytest.mark.parametrize("bad", ["../victim", "a/b", "..", ".", ".hidden", "/etc", "", "x" * 300, "a\nb"])
def test_run_ids_taken_from_users_are_plain_folder_names(bad):
    with pytest.raises(ResultsError, match="not a path"):
        check_run_id(bad, "--resume")
    assert check_run_id("20261123T121443Z-amd-epyc-2") == "20261123T121443Z-amd-epyc-2"


def test_resume_store_needs_a_run_of_that_suite(tmp_path):
    store = RunStore(tmp_path, "demo", "r1")
    store.write_run_info({"suite": "other"})
    with pytest.raises(ResultsError, match="is a run of suite 'other', not 'demo'"):
        resume_store(tmp_path, "demo", "r1")
    with pytest.raises(ResultsError, match="no run of suite 'demo'"):
        resume_store(tmp_path, "demo", "r2")
    store.update_run_info(suite="demo")
    assert resume_store(tmp_path, "demo", "r1").path == store.path


def test_the_run_lock_is_exclusive_and_released(tmp_path):
    store = RunStore(tmp_path, "demo", "r1")
    with store.lock("first"):
        with pytest.raises(RunLockedError, match=r"in use by pid \d+ on .* \(first since"):
            with RunStore(tmp_path, "demo", "r1").lock("second"):
                pass
    with RunStore(tmp_path, "demo", "r1").lock("third"):  # released on exit
        pass


def test_a_finished_run_stores_each_row_once_and_a_resume_goes_on_from_parquet_and_journal(tmp_path):
    store = RunStore(tmp_path, "demo", "r1")
    store.append(row("aaa"))
    store.append(row("bbb", status="error"))
    assert sorted(p.name for p in (store.path / "cells").iterdir()) == ["aaa.json", "bbb.json"]
    store.fold()
    assert not list((store.path / "cells").iterdir())  # the journal is empty ...
    assert pd.read_parquet(store.path / "results.parquet")["cell_key"].tolist() == ["aaa", "bbb"]  # ... the parquet holds all
    assert store.finished_keys() == {"aaa"}
    # resumed: a journal row replaces the parquet's row of its key, new keys come after
    store.append(row("bbb", time_ms_median=2.5))
    store.append(row("ccc"))
    assert [(r["cell_key"], r["status"]) for r in store.rows()] == [("aaa", "ok"), ("bbb", "ok"), ("ccc", "ok")]
    assert load(store.path).set_index("cell_key")["time_ms_median"].to_dict() == {"aaa": 1.5, "bbb": 2.5, "ccc": 1.5}
    store.remove(["aaa"])  # from the parquet, not only from the journal
    store.fold()
    assert load(store.path)["cell_key"].tolist() == ["bbb", "ccc"] and not list((store.path / "cells").iterdir())


def test_rows_of_a_folded_run_are_its_stored_values_without_missing_columns(tmp_path):
    store = RunStore(tmp_path, "demo", "r1")
    store.append(row("aaa", extra_metric=3))
    store.append(row("bbb"))
    store.fold()
    first, second = store.rows()
    assert first["extra_metric"] == 3 and "extra_metric" not in second  # NaN padding is not a value
    assert list(first["time_ms_samples"]) == [1.0, 1.5, 2.0]


def test_an_unreadable_parquet_stops_a_run_but_load_falls_back_to_the_journal(tmp_path):
    store = RunStore(tmp_path, "demo", "r1")
    store.append(row("aaa"))
    (store.path / "results.parquet").write_bytes(b"garbage")
    with pytest.raises(ResultsError, match="move it away"):
        store.rows()
    with pytest.warns(CorruptCellWarning, match="only the journal's rows"):
        assert load(store.path)["cell_key"].tolist() == ["aaa"]
