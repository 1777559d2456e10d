"""MLflow export: a tracking store (default `sqlite:///<dest>/mlflow.db`, or any tracking URI).

One MLflow experiment per suite; per exported harness run one parent MLflow run (tags: run id,
code version, device; artifacts: run.json and the run's report folder when it has been rendered)
and one nested run per cell (harness.export.ExportCell) with the cell's configuration as params,
its metrics with their steps (training step, or seq_len for a benchmark series) and tags. Runs are
found again by their tags (`harness.run_id`, `harness.cell`), and metrics carry the time stamps
of the rows, so exporting the same run again updates its MLflow runs instead of adding new ones.
Open with `mlflow ui --backend-store-uri sqlite:///<dest>/mlflow.db`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from harness.export import ExportCell, ExportError, export_cells, missing_package, run_names
from harness.store.files import RUN_INFO
from harness.store.reader import StoredRun
from harness.store.schema import STATUS_OK

RUN_TAG = "harness.run_id"
CELL_TAG = "harness.cell"  # the cell's key; "run" on the parent run
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
BATCH = 900  # metrics per log_batch call (MLflow allows 1000)


def _find_run(client: Any, experiment_id: str, run_id: str, cell: str) -> str | None:
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}' and tags.`{CELL_TAG}` = '{cell}'", max_results=1
    )
    return found[0].info.run_id if found else None


def _open_run(client: Any, experiment_id: str, run_id: str, cell: str, name: str, tags: dict[str, str]) -> str:
    existing = _find_run(client, experiment_id, run_id, cell)
    if existing is not None:
        for key, value in tags.items():
            client.set_tag(existing, key, value)
        return existing
    return client.create_run(experiment_id, run_name=name, tags={RUN_TAG: run_id, CELL_TAG: cell, **tags}).info.run_id


def _log_cell(client: Any, mlflow_run: str, cell: ExportCell) -> None:
    from mlflow.entities import Metric, Param

    existing = client.get_run(mlflow_run).data.params
    params = [Param(k[:250], str(v)[:MAX_PARAM_CHARS]) for k, v in cell.params.items() if k[:250] not in existing]
    metrics = [Metric(_metric_name(name), value, millis, step) for name, points in cell.metrics.items() for step, value, millis in points]
    for start in range(0, max(len(params), 1), 90):
        client.log_batch(mlflow_run, params=params[start : start + 90])
    for start in range(0, len(metrics), BATCH):
        client.log_batch(mlflow_run, metrics=metrics[start : start + BATCH])


def _metric_name(name: str) -> str:
    """MLflow allows letters, digits, '_', '-', '.', ' ', ':' and '/' in a metric name."""
    import re

    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def export_mlflow(run: StoredRun, dest: Path, tracking_uri: str | None = None, reports: Path | None = None) -> str:
    """Export `run` to the MLflow store at `tracking_uri` (default sqlite:///<dest>/mlflow.db, with
    artifacts under <dest>/artifacts/); returns the tracking URI."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as error:
        raise missing_package("mlflow", error) from None
    for name in ("mlflow", "alembic"):  # their INFO lines on creating a store are not ours to print
        logging.getLogger(name).setLevel(logging.WARNING)
    suite, run_id = run_names(run)
    artifacts = None
    if tracking_uri is None:
        dest.mkdir(parents=True, exist_ok=True)
        tracking_uri = f"sqlite:///{(dest / 'mlflow.db').resolve()}"
        artifacts = (dest / "artifacts" / suite).resolve().as_uri()
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(suite)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(suite, artifact_location=artifacts)
        tags = {"harness.suite": suite, "harness.code_version": run.code_version, "harness.device": run.device_name}
        parent = _open_run(client, experiment_id, run_id, "run", run_id, {**tags, "harness.command": str(run.info.get("command", ""))})
        for cell in export_cells(run):
            child = _open_run(
                client, experiment_id, run_id, cell.key, cell.name, {**tags, "mlflow.parentRunId": parent, "harness.label": cell.label}
            )
            _log_cell(client, child, cell)
            client.set_terminated(child, status="FINISHED" if cell.status == STATUS_OK else "FAILED")
        # run.json as read and checked by read_run (never the file again: it may be a link elsewhere)
        client.log_text(parent, json.dumps(run.info, indent=1, default=str), RUN_INFO)
        report = reports / suite / run_id if reports is not None else None
        if report is not None and report.is_dir():
            client.log_artifacts(parent, str(report), artifact_path="report")
        client.set_terminated(parent, status="FINISHED")
    except ExportError:
        raise
    except Exception as error:  # MLflow's own errors: a bad URI, an unreachable server, a store it cannot migrate
        raise ExportError(f"MLflow export to {tracking_uri} failed: {type(error).__name__}: {error}") from None
    return tracking_uri
