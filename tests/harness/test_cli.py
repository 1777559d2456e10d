"""The command line's run/list/env: exit statuses, clear messages instead of tracebacks, dry runs."""

from __future__ import annotations

import importlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import tomllib
import torch
import yaml
from test_runner import ROOT, misbehaving_variants, write_suite  # noqa: F401 - a fixture, used by name

from harness import cli
from harness.report import render_report
from harness.status import format_status, run_status
from harness.store.files import PARQUET, CorruptCellWarning
from harness.store.reader import load, load_run_info
from harness.store.writer import RunStore
from tests.harness.suites.test_quality_suite import BASE as QUALITY_SUITE


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_suite_exits_2_naming_file_and_key_without_traceback(tmp_path, capsys):
    suite = write_suite(tmp_path, "bad", [{"name": "full"}], [64], min_repeat=3)  # misspelt key
    code, out, err = run_cli(capsys, "run", str(suite), "--out", str(tmp_path / "out"))
    assert code == 2
    assert str(suite) in err and "measure.min_repeat" in err and "did you mean 'min_repeats'" in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "out").exists()


def test_unusable_input_exits_2_with_a_message(tmp_path, capsys):
    suite = write_suite(tmp_path, "ok", [{"name": "full"}], [64])
    out = str(tmp_path / "out")
    cases = {
        "suite file not found": ["run", str(tmp_path / "missing.yaml")],
        "--resume nope: no run of suite": ["run", str(suite), "--out", out, "--resume", "nope"],
        "no cells to run (after --filter": ["run", str(suite), "--filter", "seq_len > 10**6"],
        "bad filter": ["run", str(suite), "--filter", "no_such_column == 1"],
    }
    if not torch.cuda.is_available():
        cases["CUDA is not available"] = ["run", str(suite), "--device", "cuda"]
    for expected, argv in cases.items():
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, argv
        assert expected in err and "Traceback" not in err, err
    assert not Path(out).exists()


def test_missing_suite_through_the_real_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(tmp_path / "missing.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "missing.yaml" in result.stderr and "not found" in result.stderr and "Traceback" not in result.stderr


def test_dry_run_lists_cells_and_varying_columns_and_writes_nothing(tmp_path, capsys):
    path = write_suite(tmp_path, "dry", [{"name": "full"}, {"name": "lsh", "n_hashes": [1, 2]}], [64, 128])
    data = yaml.safe_load(path.read_text())
    data["sweep"]["causal"] = [False, True]
    path.write_text(yaml.safe_dump(data))
    code, out, _ = run_cli(capsys, "run", str(path), "--dry-run", "--out", str(tmp_path / "out"))
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == ["variant_label", "seq_len", "batch", "causal", "estimate_s", "key"]
    assert len(lines) == 12 + 1 and lines[-1].startswith("12 benchmark cells on cpu")
    assert "lsh n_hashes=2" in out
    assert not (tmp_path / "out").exists()


def test_list_shows_variants_with_parameters(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for name in ("full", "sdpa", "lsh"):
        assert f"\n{name}  [attention]" in "\n" + out
    assert "n_hashes: int = " in out and "bucket_size: int = " in out and "d_model: int = 256" in out


def test_env_prints_torch_version(capsys):
    code, out, _ = run_cli(capsys, "env", "--device", "cpu")
    assert code == 0
    assert torch.__version__ in out and "torch:" in out


def test_console_script_points_at_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["harness"].partition(":")
    assert getattr(importlib.import_module(module), function) is cli.main


def test_exit_1_when_every_cell_errors(tmp_path, capsys, misbehaving_variants):  # noqa: F811
    suite = write_suite(tmp_path, "broken", [{"name": "test_sleep", "seconds": -1.0}], [64])  # sleep() raises
    code, out, err = run_cli(capsys, "run", str(suite), "--out", str(tmp_path / "out"), "--in-process")
    assert code == 1
    assert "every cell failed" in err and "ValueError" in out


def test_sigterm_stops_the_run_with_130_and_marks_it_interrupted(tmp_path, misbehaving_variants):  # noqa: F811
    suite = write_suite(tmp_path, "term", [{"name": "test_sleep", "seconds": 60.0}], [64])
    command = [sys.executable, "-m", "harness", "run", str(suite), "--out", str(tmp_path / "out"), "--in-process"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith("running "):  # printed once SIGTERM is handled
                break
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert "--resume" in err and "Traceback" not in err
    # The printed command continues the same run: the same --out (it used to be dropped) and options.
    hint = err.split("Continue with: ")[1].strip()
    assert hint.startswith("python -m harness run ") and f"--out {tmp_path / 'out'}" in hint and "--in-process" in hint
    (run_dir,) = (tmp_path / "out" / "term").iterdir()
    assert "interrupted_at" in load_run_info(run_dir)


def test_profile_prints_ops_and_lsh_stages(tmp_path, capsys):
    suite = write_suite(tmp_path, "prof", [{"name": "lsh", "n_hashes": 2, "bucket_size": 16}], [64], mode="forward_backward")
    code, out, err = run_cli(capsys, "profile", str(suite), "--top", "5")
    assert code == 0, err
    assert "lsh" in out and "seq_len=64" in out and "Self CPU" in out
    for stage in ("lsh/hash", "lsh/sort", "lsh/attend", "lsh/attend_backward"):
        assert stage in out, out
    code, _, err = run_cli(capsys, "profile", str(suite), "--filter", "seq_len > 10**6")
    assert code == 2 and "no cell" in err and "Traceback" not in err


def test_check_targets_and_check_without_baseline(tmp_path, capsys):
    # never contended (a contended cell's target is inconclusive, tests/harness/test_check.py): this test is about the verdicts
    suite = write_suite(tmp_path, "tgt", [{"name": "full"}, {"name": "sdpa"}], [64], contention_other_cores=1e6)
    text = suite.read_text() + (
        "checks:\n  targets:\n"
        "    - {name: fast enough, numerator: \"variant == 'full'\", metric: time, max: 1000.0}\n"
        "    - {name: impossible, numerator: \"variant == 'full'\", denominator: \"variant == 'sdpa'\", max: 0.000001}\n"
    )
    suite.write_text(text)
    out_root = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out_root)]) == 0
    capsys.readouterr()
    code, out, err = run_cli(capsys, "check", str(out_root / "tgt"), "--root", str(out_root), "--targets")
    assert code == 1, err
    assert "fast enough" in out and "MET" in out and "impossible" in out and "MISSED" in out and "1 of 2 met" in out
    code, _, err = run_cli(capsys, "check", str(out_root / "tgt"), "--root", str(out_root))
    assert code == 2 and "--baseline" in err and "--targets" in err


# --------------------------------------------------------------------------- hardening: no code from input


def test_filter_payload_runs_no_code_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    suite = write_suite(tmp_path, "ok", [{"name": "full"}], [64])
    payload = "@pd.io.common.os.system('touch pwned') == 0 or seq_len > 0"
    for expression, problem in (
        (payload, "'@'"),
        ("1", "not a condition"),
        ("__import__('os').system('touch pwned') == 0", "calling anything"),
    ):
        code, _, err = run_cli(capsys, "run", str(suite), "--dry-run", "--filter", expression)
        assert code == 2 and problem in err and "Traceback" not in err, err
    assert not (tmp_path / "pwned").exists()


def test_targets_payload_in_a_stored_run_or_checks_file_runs_no_code(tmp_path, capsys, monkeypatch):
    """A suite's `checks:` text travels in run.json: checking someone else's run must not run its code."""
    monkeypatch.chdir(tmp_path)
    suite = write_suite(tmp_path, "tgt", [{"name": "full"}], [64])
    out_root = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out_root)]) == 0
    (run_dir,) = (out_root / "tgt").iterdir()
    info = load_run_info(run_dir)
    payload = "@pd.io.common.os.system('touch pwned') == 0"
    info["suite_text"] += f'checks:\n  targets:\n    - {{name: evil, numerator: "{payload}", max: 1.0}}\n'
    (run_dir / "run.json").write_text(json.dumps(info))
    code, _, err = run_cli(capsys, "check", str(run_dir), "--targets")
    assert code == 2 and "checks.targets.0.numerator" in err and "'@'" in err and "Traceback" not in err, err
    checks = tmp_path / "checks.yaml"
    checks.write_text(f'ratios:\n  - {{numerator: "seq_len.__class__ == 1", denominator: "{payload}"}}\n')
    code, _, err = run_cli(capsys, "check", str(run_dir), "--baseline", str(run_dir), "--checks", str(checks))
    assert code == 2 and "checks.ratios.0.numerator" in err and "attribute access" in err, err
    assert not (tmp_path / "pwned").exists()


def test_suite_with_a_payload_in_its_checks_is_rejected_before_anything_runs(tmp_path, capsys):
    suite = write_suite(tmp_path, "evil", [{"name": "full"}], [64])
    suite.write_text(suite.read_text() + "checks:\n  ratios:\n    - {numerator: \"variant == 'full'\", denominator: \"open('x') == 1\"}\n")
    code, _, err = run_cli(capsys, "run", str(suite), "--out", str(tmp_path / "out"))
    assert code == 2 and "checks.ratios[0].denominator" in err and "calling anything" in err, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- hardening: run folders


def test_resume_cannot_reach_outside_its_suite(tmp_path, capsys):
    """`--resume ../../victim/...` used to write a training run's rows into another suite's run."""
    out = tmp_path / "out"
    victim = write_suite(tmp_path, "victim", [{"name": "full"}], [64])
    assert cli.main(["run", str(victim), "--out", str(out)]) == 0
    (victim_run,) = (out / "victim").iterdir()
    before = sorted(p.name for p in (victim_run / "cells").iterdir())
    quality = tmp_path / "tiny.yaml"
    quality.write_text(QUALITY_SUITE)
    bench = write_suite(tmp_path, "bench", [{"name": "full"}], [64])
    capsys.readouterr()
    for suite in (quality, bench):
        for run_id in (f"../victim/{victim_run.name}", f"../../out/victim/{victim_run.name}", "..", "/etc"):
            code, _, err = run_cli(capsys, "run", str(suite), "--out", str(out), "--resume", run_id)
            assert code == 2 and "not a path" in err and "Traceback" not in err, (suite, run_id, err)
    # A plain id of another suite's run is not found under this suite's folder.
    code, _, err = run_cli(capsys, "run", str(bench), "--out", str(out), "--resume", victim_run.name)
    assert code == 2 and "no run of suite 'bench'" in err
    assert sorted(p.name for p in (victim_run / "cells").iterdir()) == before


def test_a_run_in_use_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    suite = write_suite(tmp_path, "busy", [{"name": "full"}], [64, 128])
    assert cli.main(["run", str(suite), "--out", str(out), "--filter", "seq_len == 64"]) == 0
    (run_dir,) = (out / "busy").iterdir()
    snapshot = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    store = RunStore(out, "busy", run_dir.name)
    with store.lock("another harness run"):  # what a second process meets while the first runs
        code, _, err = run_cli(capsys, "run", str(suite), "--out", str(out), "--resume", run_dir.name)
    assert code == 2 and "is in use by pid" in err and "another harness run" in err, err
    assert {p: p.read_bytes() for p in snapshot} == snapshot
    assert cli.main(["run", str(suite), "--out", str(out), "--resume", run_dir.name]) == 0  # free again


def test_two_concurrent_resumes_one_measures_the_other_exits_2(tmp_path, misbehaving_variants):  # noqa: F811
    suite = write_suite(tmp_path, "race", [{"name": "test_sleep", "seconds": 2.0}], [64])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "harness", "run", str(suite), "--out", str(out), "--in-process"]
    first = subprocess.run([*command, "--filter", "seq_len == 0"], cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 2  # no cells: nothing created
    starter = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in starter.stdout:
            if line.startswith("running "):
                break
        (run_dir,) = (out / "race").iterdir()
        second = subprocess.run([*command, "--resume", run_dir.name], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "is in use by pid" in second.stderr, second.stderr
        starter.communicate(timeout=120)
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
    assert starter.returncode == 0
    assert list(load(run_dir)["status"]) == ["ok"]


def test_result_files_are_world_readable(tmp_path):
    old = os.umask(0o022)
    try:
        suite = write_suite(tmp_path, "perm", [{"name": "full"}], [64])
        assert cli.main(["run", str(suite), "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    (run_dir,) = (tmp_path / "out" / "perm").iterdir()
    files = [run_dir / "run.json", run_dir / "results.parquet", *(run_dir / "cells").iterdir()]
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {"0o644"}
    assert oct(stat.S_IMODE(run_dir.stat().st_mode)) == "0o755"


# --------------------------------------------------------------------------- hardening: no silent loss


def test_an_unreadable_cell_file_is_reported_everywhere_and_measured_again(tmp_path, capsys):
    out = tmp_path / "out"
    suite = write_suite(tmp_path, "junk", [{"name": "full"}], [64, 128])
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    (run_dir,) = (out / "junk").iterdir()
    assert not list((run_dir / "cells").iterdir())  # a finished run keeps its rows once, in the parquet
    # A journal file damaged on disk before the run could fold it: its row is only there.
    key = load(run_dir)["cell_key"].iloc[0]
    RunStore(out, "junk", run_dir.name).remove([key])
    broken = run_dir / "cells" / f"{key}.json"
    broken.write_text("{not json")
    with pytest.warns(CorruptCellWarning, match=broken.name):
        assert len(load(run_dir)) == 1
    status = run_status(run_dir)
    assert status.states[broken.stem] == "corrupt" and "unreadable" in format_status(status)
    report = render_report([run_dir], out=tmp_path / "report")
    assert f"could not be read and are missing from this report:** `{broken.name}`" in (report / "report.md").read_text()
    capsys.readouterr()
    code, out_text, err = run_cli(capsys, "report", str(run_dir), "--out", str(tmp_path / "report2"))
    assert code == 0 and f"warning: {broken}" in err
    code, out_text, err = run_cli(capsys, "run", str(suite), "--out", str(out), "--resume", run_dir.name)
    assert code == 0 and "running 1 of 2 cells" in out_text and "unreadable cell file" in err, out_text + err
    assert len(load(run_dir)) == 2 and (run_dir / PARQUET).is_file() and not list((run_dir / "cells").iterdir())
    assert run_status(run_dir).counts()["done"] == 2


def test_a_resume_never_writes_over_an_unreadable_parquet_and_remeasures_a_lost_one(tmp_path, capsys):
    out = tmp_path / "out"
    suite = write_suite(tmp_path, "pq", [{"name": "full"}], [64])
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    (run_dir,) = (out / "pq").iterdir()
    assert cli.main(["run", str(suite), "--out", str(out), "--resume", run_dir.name]) == 0
    assert "nothing to run" in capsys.readouterr().out
    (run_dir / PARQUET).write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "run", str(suite), "--out", str(out), "--resume", run_dir.name)
    assert code == 2 and "unreadable parquet" in err and "move it away" in err and "Traceback" not in err
    assert (run_dir / PARQUET).read_bytes() == b"garbage"  # left for the user to look at
    (run_dir / PARQUET).unlink()
    code, out_text, _ = run_cli(capsys, "run", str(suite), "--out", str(out), "--resume", run_dir.name)
    assert code == 0 and "running 1 of 1 cells" in out_text and len(pd.read_parquet(run_dir / PARQUET)) == 1


def test_an_installed_package_writes_results_and_reports_where_the_user_is(tmp_path):
    """Installed (not a git checkout), `harness run --report` writes under the working directory
    (results/ and reports/ beside it), never beside the package, and names the package version."""
    import shutil

    site, work = tmp_path / "site-packages", tmp_path / "work"
    for package in ("harness", "variants"):
        shutil.copytree(ROOT / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    work.mkdir()
    suite = write_suite(work, "here", [{"name": "full"}], [64])
    environment = {**os.environ, "PYTHONPATH": str(site)}
    environment.pop("REFORMER_HARNESS_CODE_VERSION", None)
    command = [sys.executable, "-m", "harness", "run", suite.name, "--report"]
    done = subprocess.run(command, cwd=work, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (work / "results" / "here").iterdir()
    assert (work / "reports" / "here" / run_dir.name / "report.md").is_file()
    assert load_run_info(run_dir)["code_version"].endswith("(package)")
    assert not (site / "results").exists() and not (site / "reports").exists()
    # With --out elsewhere, the report goes beside those results.
    other = tmp_path / "elsewhere" / "results"
    done = subprocess.run([*command, "--out", str(other)], cwd=work, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "elsewhere" / "reports" / "here").iterdir())


# --------------------------------------------------------------------------- faults of the place


def failing_writes(monkeypatch, code: int, when=lambda path: True) -> None:
    """Every result-file write for which `when(path)` holds raises OSError(code), as a full disk
    (ENOSPC) or a read-only mount (EROFS) would; the others are written."""
    from harness.store import files, writer

    real = files.atomic_write_bytes

    def write(path, data):
        if when(Path(path)):
            raise OSError(code, os.strerror(code), str(path))
        real(path, data)

    for module in (files, writer):  # json files through files, the parquet through writer
        monkeypatch.setattr(module, "atomic_write_bytes", write)


def test_a_disk_full_mid_run_stops_with_the_resume_command_and_loses_nothing(tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "out"
    suite = write_suite(tmp_path, "full_disk", [{"name": "full"}], [32, 64, 128])
    written = []

    def second_cell(path: Path) -> bool:
        if path.parent.name == "cells":
            written.append(path.name)
        return len(written) >= 2

    failing_writes(monkeypatch, errno.ENOSPC, second_cell)
    code, _, err = run_cli(capsys, "run", str(suite), "--out", str(out), "--in-process")
    assert code == 2 and "Traceback" not in err and "No space left on device (ENOSPC)" in err, err
    (run_dir,) = (out / "full_disk").iterdir()
    assert f"The cells finished before it are saved in {run_dir}" in err
    assert len(load(run_dir)) == 1 and "interrupted_at" not in load_run_info(run_dir)  # run.json could not be written either
    monkeypatch.undo()  # space again
    command = err.split("continue with: ")[1].strip()
    assert command == f"python -m harness run {suite} --out {out} --in-process --resume {run_dir.name}"
    code, text, _ = run_cli(capsys, *command.split()[3:])
    assert code == 0 and "running 2 of 3 cells" in text
    rows = pd.read_parquet(run_dir / PARQUET)
    assert len(rows) == 3 and rows["cell_key"].is_unique and "finished_at" in load_run_info(run_dir)


def test_a_disk_full_at_the_start_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "out"
    suite = write_suite(tmp_path, "no_space", [{"name": "full"}], [32])
    failing_writes(monkeypatch, errno.ENOSPC)
    code, _, err = run_cli(capsys, "run", str(suite), "--out", str(out), "--in-process")
    assert code == 2 and "Traceback" not in err and "nothing was run and no run folder is left" in err, err
    assert not list((out / "no_space").iterdir())


def test_a_resume_on_a_read_only_place_exits_2_and_changes_nothing(tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "out"
    suite = write_suite(tmp_path, "ro", [{"name": "full"}], [32])
    assert cli.main(["run", str(suite), "--out", str(out), "--in-process"]) == 0
    (run_dir,) = (out / "ro").iterdir()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    capsys.readouterr()
    failing_writes(monkeypatch, errno.EROFS)
    code, _, err = run_cli(capsys, "run", str(suite), "--out", str(out), "--in-process", "--resume", run_dir.name)
    assert code == 2 and "Read-only file system (EROFS)" in err and f"--resume {run_dir.name}" in err and "Traceback" not in err, err
    assert before == {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")}


@pytest.mark.parametrize(
    "module, problem",
    [
        ("no_such_plugin_module", "cannot import 'no_such_plugin_module' (ModuleNotFoundError"),
        ("raising_plugin", "cannot import 'raising_plugin' (RuntimeError: boom at import)"),
        ("..", "cannot import '..'"),
    ],
)
def test_a_plugin_that_cannot_be_imported_is_a_clear_error_naming_it(module, problem, tmp_path, capsys, monkeypatch):
    from variants import registry

    (tmp_path / "raising_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setenv(registry.PLUGINS_ENV, module)
    suite = write_suite(tmp_path, "plugged", [{"name": "full"}], [32])
    for argv in (["list"], ["run", str(suite), "--dry-run"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and f"error: {registry.PLUGINS_ENV}: {problem}" in err and "Traceback" not in err, err


def test_the_run_summary_of_a_cell_that_failed_before_it_had_a_length(capsys):
    from harness.commands.run import print_summary

    failed = {"row_type": "train", "status": "error", "message": "DataError: bad.npz: not a readable .npz", "variant_label": "full"}
    print_summary("quality", pd.DataFrame([{**failed, "task": "images", "cell_key": "k1"}]), "images", Path("results/x"))
    out = capsys.readouterr().out
    assert "full (images L=?): error: DataError: bad.npz" in out and "1 cells: 1 error" in out


@pytest.mark.parametrize("timer", ["kernels", "graphs"])
def test_gpu_timers_on_cpu_exit_2_naming_the_key(tmp_path, capsys, timer):
    suite = write_suite(tmp_path, "timers", [{"name": "full"}], [64], timer=timer)
    code, out, err = run_cli(capsys, "run", str(suite), "--out", str(tmp_path / "out"))
    assert code == 2 and f"{suite}:" in err and "measure.timer" in err and f"'{timer}' needs a CUDA device" in err
    assert "Traceback" not in err + out and not (tmp_path / "out").exists()
