"""harness.store.schema: the column names, the row kinds, split by kind and the configuration identity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from harness.store import schema
from harness.store.files import ResultsError
from harness.store.reader import load
from variants.model import ReformerLMConfig

RESULTS = Path(__file__).resolve().parents[3] / "results"


def committed_runs() -> list[Path]:
    """Every committed run folder with a results.parquet (baselines included)."""
    return sorted(p.parent for p in RESULTS.rglob("results.parquet"))


def test_the_model_columns_are_the_models_fields():
    fields = [f.name for f in dataclasses.fields(ReformerLMConfig) if f.name not in ("attention", "attention_params")]
    assert list(schema.MODEL_COLUMNS) == fields
    assert [name for name, _ in schema.model_defaults()] == fields


def test_columns_hold_every_name_and_no_value():
    assert {"time_ms_median", "peak_mem_mib", "row_type", "cell_key", "nvml_after_temperature_c", "eval_bpd"} <= schema.COLUMNS
    assert not {"ok", "cell", "train", "eval", "curve", "nvml_before_", "benchmark"} & schema.COLUMNS
    for group in (schema.CONFIG_COLUMNS, schema.MODEL_COLUMNS, schema.NUMERIC_COLUMNS, schema.FINITE_COLUMNS):
        assert set(group) <= schema.COLUMNS
    assert set(schema.TEXT_COLUMNS) - schema.COLUMNS == {"error"}  # held to text, never written


def test_every_column_of_the_committed_runs_is_in_the_schema_or_a_variant_parameter():
    import variants

    params = {p for name in variants.available() for p in variants.spec(name).parameters()}
    params |= {schema.VARIANT_PARAM_PREFIX + p for p in params}
    runs = committed_runs()
    assert runs, "no committed runs found"
    for run in runs:
        unknown = set(load(run).columns) - schema.COLUMNS - params
        assert not unknown, f"{run}: {sorted(unknown)}"


def test_config_key_is_the_key_the_committed_runs_stored():
    checked = 0
    for run in committed_runs():
        rows = load(run)
        if "config_key" not in rows:
            continue
        cells = rows[rows["config_key"].notna() & rows.get("row_type", pd.Series(index=rows.index, dtype=object)).isna()]
        for row in cells.to_dict("records"):
            assert schema.config_key(row) == row["config_key"], (run, row["cell_key"])
            checked += 1
    assert checked > 100


def test_config_key_ignores_labels_and_measure_settings_and_default_model_columns():
    row = {"workload": "attention", "mode": "forward", "device": "cpu", "dtype": "float32", "seq_len": 1024, "batch": 2}
    row |= {"tokens_per_batch": None, "variant": "lsh", "variant_params": '{"n_hashes": 2}'}
    key = schema.config_key(row)
    assert key == schema.config_key(row | {"variant_label": "LSH-2", "suite": "other", "threads": 4, "d_model": 256})
    assert key == schema.config_key(row | {"variant_params": '{"n_hashes":2}', "seq_len": 1024.0})
    assert key != schema.config_key(row | {"d_model": 512})
    assert key != schema.config_key(row | {"variant_params": '{"n_hashes": 4}'})
    assert key != schema.config_key(row | {"model_variant": "hf_reformer"})
    assert key == schema.config_key(row | {"model_variant": "reformer_lm"})
    assert len(key) == 16 and int(key, 16) >= 0


def test_quality_key_leaves_out_how_a_training_ran_and_names_a_bad_row():
    row = {"variant": "lsh", "variant_params": "{}", "task_params": '{"name": "duplication"}', "eval_variant_name": "full"}
    row |= {"train_config": '{"steps": 10, "threads": 2, "timeout_s": 60}', "eval_variant_params": "{}"}
    key = schema.quality_key(row)
    assert key == schema.quality_key(row | {"train_config": '{"steps": 10, "threads": 8, "checkpoint_every": 5}'})
    assert key != schema.quality_key(row | {"train_config": '{"steps": 20}'})
    assert key != schema.quality_key(row | {"eval_variant_name": "lsh"})
    with pytest.raises(ResultsError, match="cell 'k1'.*task_params"):
        schema.quality_key(row | {"task_params": "[" * 200, "cell_key": "k1"})


def rows_of_every_kind() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"cell_key": "a", "status": "ok"},  # a benchmark cell: no row_type
            {"cell_key": "b-r1", "row_type": "round", "status": "ok"},
            {"cell_key": "c", "row_type": "train", "status": "ok"},
            {"cell_key": "c-step00000010", "row_type": "curve", "status": "ok", "train_key": "c"},
            {"cell_key": "c-eval-1", "row_type": "eval", "status": "ok", "train_key": "c"},
            {"cell_key": "d", "row_type": "train", "status": "error"},
        ]
    )


def test_split_sorts_rows_by_kind_and_keeps_their_order():
    parts = schema.split(rows_of_every_kind())
    assert list(parts.cells["cell_key"]) == ["a"]
    assert list(parts.rounds["cell_key"]) == ["b-r1"]
    assert list(parts.trains["cell_key"]) == ["c", "d"]
    assert list(parts.curves["cell_key"]) == ["c-step00000010"]
    assert list(parts.evals["cell_key"]) == ["c-eval-1"]
    assert list(parts.without_rounds["cell_key"]) == ["a", "c", "c-step00000010", "c-eval-1", "d"]
    assert list(parts.failed_trains["cell_key"]) == ["d"]
    assert list(parts.unevaluated_trains["cell_key"]) == ["d"]
    assert parts.is_quality and list(parts.own_rows["cell_key"]) == ["c", "d"]
    assert list(schema.split(rows_of_every_kind().to_dict("records")).evals["cell_key"]) == ["c-eval-1"]


def test_split_of_a_benchmark_run_and_of_rows_stored_without_a_row_type():
    bench = schema.split(pd.DataFrame([{"cell_key": "a", "status": "ok"}, {"cell_key": "b", "status": "oom"}]))
    assert not bench.is_quality and list(bench.own_rows["cell_key"]) == ["a", "b"] and bench.failed_trains.empty
    old = schema.split(pd.DataFrame([{"step": 10.0, "eval_variant": None}, {"step": 20.0, "eval_variant": "full"}, {"step": None}]))
    assert list(old.kinds) == ["curve", "eval", "cell"]


def test_keyed_rows_of_a_quality_run_are_its_evals_and_its_unevaluated_trains():
    rows = rows_of_every_kind().drop(index=[0, 1])
    rows["variant"], rows["train_config"] = "lsh", "{}"
    keyed = schema.split(rows).keyed()
    assert list(keyed["cell_key"]) == ["c-eval-1", "d"]
    assert list(keyed["config_key"]) == [schema.quality_key(r) for r in keyed.to_dict("records")]


def test_the_schema_and_the_cells_leave_pandas_out_of_a_benchmark_cell_process():
    """A cell process imports the schema through the cells; pandas would add to every cell's start."""
    import subprocess
    import sys

    code = "import sys, harness.store.schema, harness.cells.benchmark, harness.runner; print('pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=RESULTS.parent)
    assert out.stdout.strip() == "False"
