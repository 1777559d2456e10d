"""Exports of a stored run to the tools researchers already use: CSV, TensorBoard, MLflow.

    path = export_run("results/hashes/20261204T022814Z-amd-epyc", "tensorboard")   # -> exports/tensorboard/

The run is read through harness.store.reader.read_run; `export_cells` turns its rows into one
`ExportCell` per cell the tools show as a run: a training cell of a quality suite (its learning
curve over steps, its evaluations at the last step), or a series of a benchmark suite (the cells
that differ only in seq_len: each metric over seq_len, which TensorBoard and MLflow plot as their
step axis). Every name that becomes a folder or an MLflow run (suite, run id, cell) is checked to
be a plain name here, never taken from the run's files unchecked.

The exporters (harness.export.to_csv, to_tensorboard, to_mlflow) import their tool only when used;
a missing tool is an `ExportError` naming the extra to install (exit 2).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from harness.safe_io import check_name
from harness.store.files import RUN_ID_PATTERN, ResultsError
from harness.store.reader import StoredRun, read_run
from harness.store.schema import (
    ACCURACY,
    ACTIVATION_MEM_MIB,
    BATCH,
    BPD,
    CELL_KEY,
    CELL_WALL_S,
    CODE_VERSION,
    DEVICE_NAME,
    EVAL_ACCURACY,
    EVAL_BPD,
    EVAL_VARIANT,
    FLOOR_RATIO,
    LR,
    MATMUL_GFLOPS,
    MESSAGE,
    PEAK_MEM_MIB,
    PEAK_RESERVED_MIB,
    RECORDED_AT,
    ROW_TYPE,
    ROWS_WRITTEN,
    RUN_ID,
    SEQ_LEN,
    STARTED_AT,
    STATUS,
    STATUS_OK,
    STEP,
    SUITE,
    TFLOPS_PER_S,
    TIME_MS_IQR,
    TIME_MS_MEDIAN,
    TIME_MS_MIN,
    TIME_MS_SAMPLES,
    TOKENS_PER_BATCH,
    TOKENS_PER_S,
    TOKENS_SEEN,
    TRAIN_BPD,
    TRAIN_KEY,
    VARIANT_LABEL,
    WALL_S,
    RowsByKind,
    split,
)
from harness.tables import series_label

EXPORT_FORMATS = ("csv", "tensorboard", "mlflow")
CURVE_METRICS = (TRAIN_BPD, EVAL_BPD, EVAL_ACCURACY, LR, TOKENS_SEEN, WALL_S)  # quality curve columns, over step
EVAL_METRICS = {EVAL_BPD: BPD, ACCURACY: ACCURACY}  # eval row column -> name under eval/<variant>/
BENCHMARK_METRICS = (
    TIME_MS_MEDIAN,
    TIME_MS_IQR,
    TIME_MS_MIN,
    PEAK_MEM_MIB,
    PEAK_RESERVED_MIB,
    ACTIVATION_MEM_MIB,
    TOKENS_PER_S,
    TFLOPS_PER_S,
    MATMUL_GFLOPS,
    FLOOR_RATIO,
)
# Bookkeeping columns that are neither a cell's configuration nor a metric.
NOT_PARAMS = (
    RUN_ID,
    SUITE,
    CELL_KEY,
    TRAIN_KEY,
    STATUS,
    MESSAGE,
    RECORDED_AT,
    STARTED_AT,
    ROW_TYPE,
    STEP,
    CODE_VERSION,
    DEVICE_NAME,
    ROWS_WRITTEN,
    CELL_WALL_S,
    TIME_MS_SAMPLES,
)


class ExportError(Exception):
    """An export that cannot be done (a missing optional package, an unusable run): exit status 2."""


@dataclass
class ExportCell:
    """One exported run of a tool. name: a plain name (folder / run name); key: its identity
    (train_key, or the benchmark series' cell keys hashed); x: "step" or "seq_len"; params: the
    configuration (column -> scalar); metrics: name -> [(x, value, time ms)]; status: "ok" or the
    first other status of its rows."""

    name: str
    key: str
    label: str
    x: str
    params: dict[str, Any]
    metrics: dict[str, list[tuple[int, float, int]]] = field(default_factory=dict)
    status: str = STATUS_OK


def slug(text: str, limit: int = 60) -> str:
    """A readable plain-name fragment of a label: "lsh n_hashes=2" -> "lsh_n_hashes-2"."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "_", text.replace("=", "-")).strip("._-")
    return out[:limit] or "cell"


def scalar(value: Any) -> Any:
    """A row value as a plain Python scalar (numpy types unwrapped, lists as JSON), None for missing."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
        if isinstance(value, list):
            return json.dumps(value, separators=(",", ":"), default=str)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _millis(stamp: Any) -> int:
    """An ISO time stamp (recorded_at) in ms since the epoch; 0 when absent (MLflow wants one)."""
    try:
        return int(datetime.fromisoformat(str(stamp)).timestamp() * 1000)
    except (TypeError, ValueError):
        return 0


def _params(frame: pd.DataFrame, metrics: tuple[str, ...]) -> dict[str, Any]:
    """The configuration of a group of rows: the columns with one value in all of them."""
    params: dict[str, Any] = {}
    for column in frame.columns:
        if column in NOT_PARAMS or column in metrics or column.startswith(("nvml_", "time_ms_")):
            continue
        values = {json.dumps(scalar(v), default=str) for v in frame[column]}
        value = scalar(frame[column].iloc[0])
        if len(values) == 1 and value is not None:
            params[column] = value
    return params


def _series(values: pd.DataFrame, x: str, metric: str) -> list[tuple[int, float, int]]:
    """(x, value, time ms) of the rows where both `x` and `metric` are numbers, x ascending."""
    steps = pd.to_numeric(values[x], errors="coerce")
    numbers = pd.to_numeric(values[metric], errors="coerce")
    stamps = values[RECORDED_AT] if RECORDED_AT in values else values.get(STARTED_AT, pd.Series(None, index=values.index))
    kept = steps.notna() & numbers.notna()
    return sorted((int(s), float(v), _millis(t)) for s, v, t in zip(steps[kept], numbers[kept], stamps[kept]))


def _quality_cells(parts: RowsByKind) -> list[ExportCell]:
    cells = []
    curve, evals, train = parts.curves, parts.evals, parts.trains
    keys = list(dict.fromkeys([*curve.get(TRAIN_KEY, pd.Series(dtype=object)).dropna(), *train[CELL_KEY].dropna()]))
    for key in keys:
        key = check_name(key, "training cell key")
        points = curve[curve[TRAIN_KEY] == key] if TRAIN_KEY in curve else curve.iloc[0:0]
        trained = train[train[CELL_KEY] == key]
        config_rows = points if not points.empty else trained
        label = str(config_rows[VARIANT_LABEL].iloc[0]) if VARIANT_LABEL in config_rows else key
        cell = ExportCell(f"{slug(label)}-{key}", key, label, STEP, _params(config_rows, CURVE_METRICS))
        for metric in CURVE_METRICS:
            series = _series(points, STEP, metric) if metric in points else []
            if series:
                cell.metrics[metric] = series
        mine = evals[evals[TRAIN_KEY] == key] if TRAIN_KEY in evals else evals.iloc[0:0]
        variants = mine[EVAL_VARIANT].fillna("eval") if EVAL_VARIANT in mine else pd.Series("eval", index=mine.index)
        for variant, group in mine.groupby(variants.astype(str), sort=False):
            for column, name in EVAL_METRICS.items():
                series = _series(group, STEP, column) if column in group else []
                if series:
                    cell.metrics.setdefault(f"eval/{slug(variant)}/{name}", []).extend(series)
        bad = [s for s in trained.get(STATUS, pd.Series(dtype=object)).astype(str) if s != STATUS_OK]
        cell.status = bad[0] if bad else STATUS_OK
        cells.append(cell)
    return cells


def _benchmark_cells(rows: pd.DataFrame) -> list[ExportCell]:
    import hashlib

    series = series_label(rows, x=SEQ_LEN)
    if BATCH in rows and rows[BATCH].nunique() > 1 and not (TOKENS_PER_BATCH in rows and rows[TOKENS_PER_BATCH].notna().any()):
        series = series + " batch=" + rows[BATCH].astype(str)
    cells = []
    for label, group in rows.groupby(series, sort=False):
        key = hashlib.sha256("\n".join(sorted(group[CELL_KEY].astype(str))).encode()).hexdigest()[:16]
        params = _params(group, BENCHMARK_METRICS)
        params.pop(SEQ_LEN, None)
        cell = ExportCell(f"{slug(str(label))}-{key}", key, str(label), SEQ_LEN, params)
        for metric in BENCHMARK_METRICS:
            if metric in group:
                points = _series(group[group[STATUS] == STATUS_OK], SEQ_LEN, metric)
                if points:
                    cell.metrics[metric] = points
        bad = [s for s in group[STATUS].astype(str) if s != STATUS_OK]
        cell.status = bad[0] if bad else STATUS_OK
        cells.append(cell)
    return cells


def export_cells(run: StoredRun) -> list[ExportCell]:
    """The run's cells as the tools show them (module docstring), in the run's order."""
    parts = split(run.rows)
    if parts.without_rounds.empty or CELL_KEY not in run.rows:
        raise ExportError(f"{run.path}: no rows to export")
    cells = _quality_cells(parts)
    bench = parts.cells
    if not bench.empty and VARIANT_LABEL in bench:
        cells += _benchmark_cells(bench)
    return cells


def run_names(run: StoredRun) -> tuple[str, str]:
    """(suite, run id) of `run`, both checked plain names."""
    if not RUN_ID_PATTERN.fullmatch(run.run_id):
        raise ExportError(f"run id {run.run_id!r} cannot name a folder")
    return check_name(run.suite, "suite name"), check_name(run.run_id, "run id")


def default_dest(root: str | Path, target: str) -> Path:
    """`exports/<format>/` beside the results root (results/ -> exports/csv/), as reports/ is."""
    return Path(root).parent / "exports" / target


def export_run(
    run: str | Path, target: str, dest: str | Path | None = None, root: str | Path = "results", tracking_uri: str | None = None
) -> str:
    """Export the run `run` (folder, suite folder or run id under `root`) to `target` (one of
    EXPORT_FORMATS) under `dest` (default `default_dest`); returns where it went (a folder or,
    for MLflow, the tracking URI). ExportError / ResultsError for anything unusable."""
    if target not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {target!r}; formats: {', '.join(EXPORT_FORMATS)}")
    stored = read_run(run, root)
    folder = Path(dest) if dest is not None else default_dest(root, target)
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"--dest {folder}: exists and is not a folder")
    try:
        if target == "csv":
            from harness.export.to_csv import export_csv

            return str(export_csv(stored, folder))
        if target == "tensorboard":
            from harness.export.to_tensorboard import export_tensorboard

            return str(export_tensorboard(stored, folder))
        from harness.export.to_mlflow import export_mlflow

        return export_mlflow(stored, folder, tracking_uri=tracking_uri, reports=Path(root).parent / "reports")
    except OSError as error:
        raise ExportError(f"cannot write the {target} export under {folder}: {error}") from None


def missing_package(package: str, error: ImportError) -> ExportError:
    """The ExportError for an exporter whose tool is not installed."""
    return ExportError(
        f"the {package} export needs the optional package {package!r} ({error}); "
        f"install it with: pip install 'reformer-harness[export]' (or pip install {package})"
    )


__all__ = ["EXPORT_FORMATS", "ExportCell", "ExportError", "ResultsError", "export_cells", "export_run", "run_names"]
