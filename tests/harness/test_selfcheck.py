"""`harness selfcheck`: the fixed check list, each check's verdict against independent references
(hand-computed errors, known allocations and durations, float64, hashing in every dtype), a
deliberately broken plugin variant, the JSON summary and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import variants
import variants.attention.lsh as lsh_module
from harness import cli, selfcheck
from harness import measurement as measure
from harness.selfcheck import DTYPES, LSH_ROUNDS, Context, LshCase, Tolerance

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "tests" / "data" / "plugins"
LINE = re.compile(r"^(PASS|FAIL|SKIP)  (\S+) +(.*)  (\d+\.\d\d)s$")


def cpu_context(folder: Path, quick: bool = True) -> Context:
    return Context(torch.device("cpu"), quick, folder)


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process checks on one torch thread: tiny ops on two threads crawl when another job holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the list


def test_list_names_every_variant_dtype_lsh_round_and_runner_check(capsys):
    assert cli.main(["selfcheck", "--list", "--quick"]) == 0
    quick = capsys.readouterr().out.split()
    expected = {f"variant/{name}/{dtype}" for name in variants.available() for dtype in DTYPES}
    expected |= {f"lsh/rounds={n}/{word}/{dtype}" for n in (1, 2, 4, 8) for word in ("causal", "bidirectional") for dtype in DTYPES}
    expected |= {f"lsh_triton/rounds={n}/{word}/{dtype}" for n in (1, 4) for word in ("causal", "bidirectional") for dtype in DTYPES}
    expected |= {"device", "timer", "peak_memory", "nvml", "oom", "pool", "suite"}
    assert set(quick) == expected and len(quick) == len(expected)
    assert LSH_ROUNDS == (1, 2, 4, 8)
    assert cli.main(["selfcheck", "--list", "--device", "cuda"]) == 0  # listing needs no GPU
    full = capsys.readouterr().out.split()
    assert set(quick) < set(full) and {"lsh/long/rounds=8/causal/float32", "lsh/recompute/rounds=4/causal/bfloat16"} <= set(full)


# --------------------------------------------------------------------------- comparing with float64


def test_relative_error_and_verdicts_against_hand_computed_values():
    assert selfcheck.relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5], dtype=torch.float64)) == pytest.approx(0.2)
    assert selfcheck.relative_error(torch.tensor([0.5]), torch.zeros(1, dtype=torch.float64)) == pytest.approx(0.5)
    tolerance = Tolerance(forward=1e-3, grad=1e-2)
    assert selfcheck.judge({"output": 1e-4, "input": 5e-3}, tolerance).status == "PASS"
    failed = selfcheck.judge({"output/causal": 1e-4, "input": 5e-3, "in_proj.weight": 0.5}, tolerance)
    assert failed.status == "FAIL" and failed.detail.startswith("gradient of in_proj.weight off by 5.00e-01 > tol 0.01")
    assert selfcheck.judge({"output/causal": float("nan"), "input": 0.0}, tolerance).status == "FAIL"


def test_reference_holds_exactly_the_device_weights_and_inputs():
    master = selfcheck.build_small("lsh", causal=True)
    for dtype in (torch.bfloat16, torch.float16):
        device_copy = selfcheck.on_device(master, torch.device("cpu"), dtype)
        reference = selfcheck.rounded_reference(master, dtype)
        for (name, low), (_, wide) in zip(device_copy.named_parameters(), reference.named_parameters()):
            assert low.dtype == dtype and wide.dtype == torch.float64
            assert torch.equal(low.double(), wide), name
            assert not torch.equal(wide, dict(master.named_parameters())[name])  # rounding did happen


def test_a_variant_without_a_cpu_kernel_is_checked_against_its_registered_ancestor():
    assert selfcheck.registered_ancestors("sdpa_efficient")[0][0] == "sdpa"
    master = selfcheck.build_small("sdpa_efficient", causal=True)
    inputs = selfcheck.variant_inputs("attention", master)
    run, used = selfcheck.reference_run("sdpa_efficient", master, inputs, torch.float32)
    sdpa = variants.spec("sdpa").module_cls(master.config).double()
    sdpa.load_state_dict(selfcheck.rounded_reference(master, torch.float32).state_dict())
    expected = selfcheck.forward_backward(sdpa, selfcheck.widened(inputs, torch.float32))
    assert used == "sdpa" and torch.equal(run["output"], expected["output"])


def test_variant_checks_pass_for_every_kind_in_every_dtype(tmp_path):
    for name in ("full", "lsh", "ffn", "standard", "reversible", "reformer_lm"):
        for dtype in DTYPES:
            outcome = selfcheck.check_variant(name, dtype, cpu_context(tmp_path))
            assert outcome.status == "PASS", (name, dtype, outcome.detail)
            assert max(outcome.data["errors"].values()) <= selfcheck.TOLERANCES[dtype].grad


# --------------------------------------------------------------------------- the LSH core


def test_lsh_inputs_hash_into_the_same_buckets_in_every_dtype():
    case = LshCase(8, causal=True)
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        qk, _, rotations = selfcheck.lsh_inputs(case, dtype_name)
        wide = lsh_module.hash_buckets(qk, 8, case.n_buckets, rotations)
        low = lsh_module.hash_buckets(qk.to(dtype), 8, case.n_buckets, rotations.to(dtype))
        assert torch.equal(low, wide), dtype_name


def test_weak_hashes_flags_near_ties_only():
    rotations = torch.eye(2, dtype=torch.float64).view(1, 2, 1, 2)  # one head, one round, buckets of +-x, +-y
    qk = torch.tensor([[1.0, 0.2], [1.0, 0.9999]], dtype=torch.float64).view(1, 1, 2, 2)
    assert selfcheck.weak_hashes(qk, rotations, margin=1e-3).tolist() == [[[False, True]]]


def test_lsh_checks_pass_and_catch_a_core_that_is_wrong_off_float64(tmp_path, monkeypatch):
    for n_hashes in LSH_ROUNDS:
        outcome = selfcheck.check_lsh(LshCase(n_hashes, causal=n_hashes % 2 == 0), "float32", cpu_context(tmp_path))
        assert outcome.status == "PASS" and max(outcome.data["errors"].values()) < 1e-5, outcome.detail
    original = lsh_module.lsh_attention

    def ignores_causal_off_float64(qk, v, **options):
        if qk.dtype != torch.float64:
            options["causal"] = False
        return original(qk, v, **options)

    monkeypatch.setattr(lsh_module, "lsh_attention", ignores_causal_off_float64)
    broken = selfcheck.check_lsh(LshCase(4, causal=True), "float32", cpu_context(tmp_path))
    assert broken.status == "FAIL" and broken.detail.startswith("output off by")


# --------------------------------------------------------------------------- measurement machinery


def test_timer_check_times_a_known_busy_wait_and_fails_a_wrong_timer(tmp_path, monkeypatch):
    outcome = selfcheck.check_timer(cpu_context(tmp_path))
    assert outcome.status == "PASS", outcome.detail
    assert 10.0 <= outcome.data["min_ms"] and outcome.data["median_ms"] <= 15.0
    real = measure.time_callable
    monkeypatch.setattr(measure, "time_callable", lambda *a, **k: measure.Timing([s / 2 for s in real(*a, **k).samples_ms]))
    assert selfcheck.check_timer(cpu_context(tmp_path)).status == "FAIL"


def test_peak_memory_check_reads_a_known_allocation_and_fails_a_wrong_reading(tmp_path, monkeypatch):
    outcome = selfcheck.check_peak_memory(cpu_context(tmp_path))
    assert outcome.status == "PASS", outcome.detail
    assert 64.0 <= outcome.data["peak_mib"] <= 88.0  # 64 MiB written, plus allocator and page-table slack
    monkeypatch.setattr(measure, "measure_peak_memory", lambda fn, device: measure.MemoryReading(32.0, None, "vmhwm_clear_refs"))
    assert selfcheck.check_peak_memory(cpu_context(tmp_path)).status == "FAIL"


def test_triton_checks_skip_on_cpu_with_their_reason(tmp_path):
    """`lsh_triton/*` check the Triton kernels on CUDA only: on CPU each is a SKIP that says where they are tested."""
    summary = selfcheck.run_selfcheck(device="cpu", only=["lsh_triton/rounds=4/causal/*"], out=tmp_path)
    assert summary.counts == {"PASS": 0, "FAIL": 0, "SKIP": 3} and summary.exit_code == 0
    assert all("run on CUDA" in r.detail for r in summary.results)


def test_nvml_check_skips_on_cpu_with_its_reason(tmp_path):
    with pytest.raises(selfcheck.Skip, match="--device cuda"):
        selfcheck.check_nvml(cpu_context(tmp_path))


def test_oom_check_gets_an_oom_row_from_the_cell_process(tmp_path):
    outcome = selfcheck.check_oom(cpu_context(tmp_path))
    assert outcome.status == "PASS", outcome.detail
    assert outcome.data["row"]["status"] == "oom" and outcome.data["row"]["memory_limit_mib"] == 256.0


def test_pool_check_runs_two_cells_each_with_its_slots_thread_share(tmp_path):
    outcome = selfcheck.check_pool(cpu_context(tmp_path))
    assert outcome.status == "PASS", outcome.detail
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert [row["threads"] for row in outcome.data["rows"]] == [share, share]


def test_suite_check_runs_a_suite_end_to_end_and_renders_its_report(tmp_path):
    outcome = selfcheck.check_suite(cpu_context(tmp_path))
    assert outcome.status == "PASS", outcome.detail
    (run,) = (tmp_path / "suite" / "results" / "selfcheck_suite").iterdir()
    rows = pd.read_parquet(run / "results.parquet")
    assert sorted(rows["seq_len"]) == [64, 128] and set(rows["status"]) == {"ok"}
    report = tmp_path / "suite" / "report"
    assert (report / "report.md").is_file() and (report / "index.html").is_file() and list(report.glob("*.png"))


# --------------------------------------------------------------------------- the command


def test_summary_lines_and_json(tmp_path):
    lines: list[str] = []
    summary = selfcheck.run_selfcheck(
        "cpu", quick=True, only=["device", "nvml", "variant/standard/*"], out=tmp_path, print_line=lines.append
    )
    assert summary.exit_code == 0 and summary.counts == {"PASS": 4, "FAIL": 0, "SKIP": 1}
    header, *checks, last = lines
    assert header.startswith("selfcheck on cpu") and last.startswith("selfcheck passed: 4 PASS, 0 FAIL, 1 SKIP")
    parsed = [LINE.match(line) for line in checks]
    assert all(parsed) and [m.group(2) for m in parsed] == ["device", "nvml", *(f"variant/standard/{d}" for d in DTYPES)]
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
        selfcheck.run_selfcheck("cpu", only=["device", "variant/ffn/*"], out=tmp_path, print_line=interrupt_after_two_checks)
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
