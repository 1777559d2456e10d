"""harness.selfcheck.run and `harness selfcheck`: the fixed check list, the summary lines and JSON
(rewritten after every check), a deliberately broken plugin variant, Triton checks skipped on CPU,
bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import variants
from harness import cli
from harness.selfcheck import run_selfcheck
from harness.selfcheck.lsh_checks import LSH_ROUNDS
from harness.selfcheck.references import CHECKED_DTYPES

ROOT = Path(__file__).resolve().parents[3]
PLUGINS = ROOT / "tests" / "data" / "plugins"
LINE = re.compile(r"^(PASS|FAIL|SKIP)  (\S+) +(.*)  (\d+\.\d\d)s$")


def test_list_names_every_variant_dtype_lsh_round_and_runner_check(capsys):
    assert cli.main(["selfcheck", "--list", "--quick"]) == 0
    quick = capsys.readouterr().out.split()
    expected = {f"variant/{name}/{dtype}" for name in variants.available() for dtype in CHECKED_DTYPES}
    words = ("causal", "bidirectional")
    expected |= {f"lsh/rounds={n}/{word}/{dtype}" for n in (1, 2, 4, 8) for word in words for dtype in CHECKED_DTYPES}
    expected |= {f"lsh_triton/rounds={n}/{word}/{dtype}" for n in (1, 4) for word in words for dtype in CHECKED_DTYPES}
    expected |= {"device", "timer", "gpu_timers", "peak_memory", "nvml", "oom", "pool", "suite"}
    assert set(quick) == expected and len(quick) == len(expected)
    assert LSH_ROUNDS == (1, 2, 4, 8)
    assert cli.main(["selfcheck", "--list", "--device", "cuda"]) == 0  # listing needs no GPU
    full = capsys.readouterr().out.split()
    assert set(quick) < set(full) and {"lsh/long/rounds=8/causal/float32", "lsh/recompute/rounds=4/causal/bfloat16"} <= set(full)


def test_triton_checks_skip_on_cpu_with_their_reason(tmp_path):
    """`lsh_triton/*` check the Triton kernels on CUDA only: on CPU each is a SKIP that says where they are tested."""
    summary = run_selfcheck(device="cpu", only=["lsh_triton/rounds=4/causal/*"], out=tmp_path)
    assert summary.counts == {"PASS": 0, "FAIL": 0, "SKIP": 3} and summary.exit_code == 0
    assert all("run on CUDA" in r.detail for r in summary.results)


def test_summary_lines_and_json(tmp_path):
    lines: list[str] = []
    summary = run_selfcheck("cpu", quick=True, only=["device", "nvml", "variant/standard/*"], out=tmp_path, print_line=lines.append)
    assert summary.exit_code == 0 and summary.counts == {"PASS": 4, "FAIL": 0, "SKIP": 1}
    header, *checks, last = lines
    assert header.startswith("selfcheck on cpu") and last.startswith("selfcheck passed: 4 PASS, 0 FAIL, 1 SKIP")
    parsed = [LINE.match(line) for line in checks]
    assert all(parsed) and [m.group(2) for m in parsed] == ["device", "nvml", *(f"variant/standard/{d}" for d in CHECKED_DTYPES)]
    document = json.loads((tmp_path / "selfcheck.json").read_text())
    assert document["ok"] is True and document["finished"] is True and document["device"] == "cpu"
    assert document["counts"] == summary.counts and document["planned"] == [m.group(2) for m in parsed]
    assert [c["name"] for c in document["checks"]] == [m.group(2) for m in parsed]
    assert all(c["seconds"] >= 0 and c["status"] in ("PASS", "SKIP") for c in document["checks"])
    assert document["environment"]["torch"] == torch.__version__


def test_the_json_is_rewritten_after_every_check_so_an_interrupted_run_leaves_its_results(tmp_path):
    lines: list[str] = []

    def interrupt_after_two_checks(line: str) -> None:
        lines.append(line)
        if len(lines) == 3:  # the header and two checks
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_selfcheck("cpu", only=["device", "variant/ffn/*"], out=tmp_path, print_line=interrupt_after_two_checks)
    document = json.loads((tmp_path / "selfcheck.json").read_text())
    assert document["finished"] is False and document["ok"] is False and len(document["planned"]) == 4
    assert [c["name"] for c in document["checks"]] == ["device", "variant/ffn/float32"]


def test_a_broken_plugin_variant_fails_with_a_clear_line(tmp_path):
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PLUGINS), str(ROOT)]),
        "REFORMER_HARNESS_PLUGINS": "harness_selfcheck_variants",
    }
    command = [
        sys.executable,
        "-m",
        "harness",
        "selfcheck",
        "--device",
        "cpu",
        "--only",
        "variant/selfcheck_*/float32",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = {m.group(2): m for m in map(LINE.match, result.stdout.splitlines()) if m}
    wrong_output, wrong_gradient = lines["variant/selfcheck_wrong_output/float32"], lines["variant/selfcheck_wrong_gradient/float32"]
    assert wrong_output.group(1) == "FAIL" and re.match(r"output/\w+ off by 1\.0\de-02 > tol 0.0001", wrong_output.group(3))
    assert wrong_gradient.group(1) == "FAIL" and re.match(r"gradient of \S+ off by 1\.00e\+00 > tol 0.001", wrong_gradient.group(3))
    assert "selfcheck FAILED: 0 PASS, 2 FAIL" in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert json.loads((tmp_path / "selfcheck.json").read_text())["ok"] is False


def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = {
        "no check matches": ["selfcheck", "--only", "no-such-check*", "--out", str(tmp_path)],
        "cannot create it": ["selfcheck", "--only", "device", "--out", str(blocker / "sub")],
    }
    if not torch.cuda.is_available():
        cases["CUDA is not available here"] = ["selfcheck", "--device", "cuda", "--out", str(tmp_path)]
    for expected, argv in cases.items():
        assert cli.main(argv) == 2, argv
        captured = capsys.readouterr()
        assert expected in captured.err and "Traceback" not in captured.err + captured.out, captured.err
    assert not (tmp_path / "selfcheck.json").exists()
