"""harness export: what each exporter wrote, read back through the tool's own reader (pandas,
TensorBoard's EventAccumulator, MLflow's client) and compared with the run's rows read straight
from its results.parquet, or with the formulas of the synthetic benchmark run (report_fixtures)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from harness import cli
from harness.export import export_cells, export_run
from harness.store.files import ResultsError
from harness.store.reader import read_run
from tests.harness import report_fixtures as fx

ROOT = Path(__file__).resolve().parents[3]
QUALITY_RUN = ROOT / "results" / "hashes" / "20261204T022814Z-amd-epyc"  # a committed quality run, read only
CURVE_COLUMNS = ("train_bpd", "eval_bpd", "lr")


def parquet_rows(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "results.parquet")


def stored_curves(run: Path) -> dict[str, pd.DataFrame]:
    """train_key -> that cell's curve rows (step-sorted), straight from the parquet file."""
    rows = parquet_rows(run)
    curve = rows[rows["row_type"] == "curve"]
    return {key: group.sort_values("step") for key, group in curve.groupby("train_key")}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)  # TensorBoard stores float32


@pytest.fixture
def quality_run(tmp_path: Path) -> Path:
    """A copy of the committed run, so nothing can touch the repository's results."""
    assert (QUALITY_RUN / "results.parquet").is_file()
    copy = tmp_path / "results" / "hashes" / QUALITY_RUN.name
    shutil.copytree(QUALITY_RUN, copy)
    return copy


@pytest.fixture
def benchmark_run(tmp_path: Path) -> Path:
    return fx.seq_length_run(tmp_path / "results")


# --------------------------------------------------------------------------- csv


def test_csv_holds_every_row_under_one_header(quality_run: Path, tmp_path: Path) -> None:
    folder = Path(export_run(quality_run, "csv", dest=tmp_path / "csv", root=tmp_path / "results"))
    assert folder == tmp_path / "csv" / "hashes" / QUALITY_RUN.name
    rows = parquet_rows(quality_run)
    curves = pd.read_csv(folder / "curves.csv")
    cells = pd.read_csv(folder / "rows.csv")
    stored_curve = rows[rows["row_type"] == "curve"].reset_index(drop=True)
    assert len(curves) == len(stored_curve) and len(cells) == len(rows) - len(stored_curve)
    assert sorted(cells["row_type"].unique()) == ["eval", "train"]
    for column in CURVE_COLUMNS + ("step",):
        pd.testing.assert_series_equal(curves[column], stored_curve[column], check_dtype=False, check_names=False)
    assert list(curves["cell_key"]) == list(stored_curve["cell_key"])
    assert (folder / "curves.csv").read_text().count("train_bpd") == 1  # one header line


def test_csv_of_a_benchmark_run_matches_the_formulas(benchmark_run: Path, tmp_path: Path) -> None:
    folder = Path(export_run(benchmark_run, "csv", dest=tmp_path / "csv", root=tmp_path / "results"))
    table = pd.read_csv(folder / "rows.csv")
    assert not (folder / "curves.csv").exists()
    ok = table[table["status"] == "ok"]
    assert len(table) == len(fx.SEQ_VARIANTS) * len(fx.SEQ_LENS)
    for _, row in ok.iterrows():
        assert close(row["time_ms_median"], fx.seq_time_ms(row["variant_label"], int(row["seq_len"])))
    assert json.loads(table["time_ms_samples"].iloc[0])  # lists as JSON text


def test_evaluations_are_metrics_at_their_step(quality_run: Path, tmp_path: Path) -> None:
    """Each eval row becomes `eval/<eval variant>/bpd` of its training cell, at the row's step."""
    rows = parquet_rows(quality_run)
    evals = rows[rows["row_type"] == "eval"]
    assert len(evals) > 0
    cells = {c.key: c for c in export_cells(read_run(quality_run, root=tmp_path / "results"))}
    for _, row in evals.iterrows():
        (series,) = [v for k, v in cells[row["train_key"]].metrics.items() if k.startswith("eval/") and k.endswith("/bpd")]
        assert [(s, v) for s, v, _ in series] == [(int(row["step"]), float(row["eval_bpd"]))]
    assert not any(k.endswith("/accuracy") for c in cells.values() for k in c.metrics)  # NaN accuracy: no metric


# --------------------------------------------------------------------------- tensorboard


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_curves_read_back_as_stored(quality_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    folder = Path(export_run(quality_run, "tensorboard", dest=tmp_path / "tb", root=tmp_path / "results"))
    curves = stored_curves(quality_run)
    run_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    assert sorted(p.name.rsplit("-", 1)[1] for p in run_dirs) == sorted(curves)  # one run directory per cell
    for run_dir in run_dirs:
        stored = curves[run_dir.name.rsplit("-", 1)[1]]
        scalars = tensorboard_scalars(run_dir)
        for column in CURVE_COLUMNS:
            expected = [(int(s), float(v)) for s, v in zip(stored["step"], stored[column]) if pd.notna(v)]
            got = scalars[column]
            assert [s for s, _ in got] == [s for s, _ in expected]
            assert all(close(g, e) for (_, g), (_, e) in zip(got, expected))
    # Exporting again replaces the event files: still one value per step.
    export_run(quality_run, "tensorboard", dest=tmp_path / "tb", root=tmp_path / "results")
    again = tensorboard_scalars(run_dirs[0])
    assert len(again["eval_bpd"]) == len(curves[run_dirs[0].name.rsplit("-", 1)[1]])


def test_tensorboard_benchmark_metrics_are_over_seq_len(benchmark_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    folder = Path(export_run(benchmark_run, "tensorboard", dest=tmp_path / "tb", root=tmp_path / "results"))
    cells = {c.label: c for c in export_cells(read_run(benchmark_run, root=tmp_path / "results"))}
    assert sorted(cells) == sorted(fx.SEQ_VARIANTS)
    for label, cell in cells.items():
        scalars = tensorboard_scalars(folder / cell.name)
        expected = [(L, fx.seq_time_ms(label, L)) for L in fx.SEQ_LENS if not fx.seq_oom(label, L)]
        assert [s for s, _ in scalars["time_ms_median"]] == [L for L, _ in expected]
        assert all(close(v, e) for (_, v), (_, e) in zip(scalars["time_ms_median"], expected))
        peaks = dict(scalars["peak_mem_mib"])
        assert all(close(peaks[L], fx.seq_peak_mib(label, L)) for L, _ in expected)


# --------------------------------------------------------------------------- mlflow


def mlflow_client(dest: Path):
    tracking = pytest.importorskip("mlflow.tracking")
    return tracking.MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")


def test_mlflow_runs_hold_the_curves_and_a_second_export_updates_them(quality_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    dest = tmp_path / "mlflow"
    reports = tmp_path / "reports" / "hashes" / QUALITY_RUN.name
    reports.mkdir(parents=True)
    (reports / "report.md").write_text("# report\n")
    uri = export_run(quality_run, "mlflow", dest=dest, root=tmp_path / "results")
    assert uri == f"sqlite:///{(dest / 'mlflow.db').resolve()}"
    client = mlflow_client(dest)
    experiment = client.get_experiment_by_name("hashes")
    curves = stored_curves(quality_run)

    def check() -> None:
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        cells = {r.data.tags["harness.cell"]: r for r in runs}
        assert sorted(cells) == sorted([*curves, "run"])  # one MLflow run per cell, plus the run's own
        parent = cells.pop("run")
        for key, run in cells.items():
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert run.data.tags["harness.run_id"] == QUALITY_RUN.name
            assert run.data.tags["harness.code_version"] == str(curves[key]["code_version"].iloc[0])
            assert run.data.params["variant_label"] == str(curves[key]["variant_label"].iloc[0])
            for column in CURVE_COLUMNS:
                history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, column))
                stored = [(int(s), float(v)) for s, v in zip(curves[key]["step"], curves[key][column]) if pd.notna(v)]
                assert history == stored
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"run.json", "report"} <= artifacts

    check()
    export_run(quality_run, "mlflow", dest=dest, root=tmp_path / "results")
    check()  # the same runs and one value per step, not two


def test_mlflow_benchmark_metrics_have_seq_len_steps(benchmark_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    export_run(benchmark_run, "mlflow", dest=tmp_path / "mlflow", root=tmp_path / "results")
    client = mlflow_client(tmp_path / "mlflow")
    experiment = client.get_experiment_by_name(fx.SEQ_SUITE)
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags["harness.cell"] != "run"]
    assert sorted(r.data.tags["harness.label"] for r in runs) == sorted(fx.SEQ_VARIANTS)
    for run in runs:
        label = run.data.tags["harness.label"]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "time_ms_median"))
        assert [s for s, _ in history] == [L for L in fx.SEQ_LENS if not fx.seq_oom(label, L)]
        assert all(close(v, fx.seq_time_ms(label, s)) for s, v in history)
        assert run.info.status == ("FAILED" if any(fx.seq_oom(label, L) for L in fx.SEQ_LENS) else "FINISHED")


# --------------------------------------------------------------------------- the command and bad input


def test_export_command_and_its_errors(quality_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    code = cli.main(["export", str(quality_run), "--to", "csv", "--dest", str(tmp_path / "out"), "--root", str(tmp_path / "results")])
    assert code == 0 and "export (csv):" in capsys.readouterr().out
    code = cli.main(["export", str(tmp_path / "nothing"), "--to", "csv", "--root", str(tmp_path / "results")])
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    code = cli.main(["export", str(quality_run), "--to", "csv", "--dest", str(tmp_path / "file"), "--root", str(tmp_path / "results")])
    assert code == 2 and "not a folder" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "mlflow", None)  # as if the extra were not installed
    monkeypatch.setitem(__import__("sys").modules, "mlflow.tracking", None)
    code = cli.main(["export", str(quality_run), "--to", "mlflow", "--dest", str(tmp_path / "m"), "--root", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and "reformer-harness[export]" in err and "Traceback" not in err


def test_names_from_the_run_files_are_checked_before_they_name_folders(quality_run: Path, tmp_path: Path) -> None:
    info = json.loads((quality_run / "run.json").read_text())
    (quality_run / "run.json").write_text(json.dumps({**info, "suite": "../../outside"}))
    with pytest.raises(ResultsError, match="field 'suite' '../../outside' is not a plain name"):
        export_run(quality_run, "csv", dest=tmp_path / "csv", root=tmp_path / "results")
    assert not (tmp_path / "outside").exists()
