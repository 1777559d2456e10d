"""The command line's run/list/env: exit statuses, clear messages instead of tracebacks, dry runs."""

from __future__ import annotations

import importlib
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import torch
import yaml

from harness import cli
from harness.results import load_run_info

from test_runner import ROOT, misbehaving_variants, write_suite  # noqa: F401 - a fixture, used by name


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
        "--resume nope: no run at": ["run", str(suite), "--out", out, "--resume", "nope"],
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
    result = subprocess.run([sys.executable, "-m", "harness", "run", str(tmp_path / "missing.yaml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
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
    assert len(lines) == 12 + 1 and lines[-1].startswith("12 cells on cpu")
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
    suite = write_suite(tmp_path, "tgt", [{"name": "full"}, {"name": "sdpa"}], [64])
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
