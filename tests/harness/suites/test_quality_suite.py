"""harness.quality: suite validation and expansion, running a tiny suite end to end through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from harness.cli import main
from harness.store.reader import load
from harness.suites import SuiteError, load_suite
from harness.tables import accuracy_table
from tests.processes import default_sigint

ROOT = Path(__file__).resolve().parents[3]

BASE = """\
name: tiny
kind: quality
task: {name: duplication, seq_len: 32, vocab_size: 16}
model: {d_model: 32, d_ff: 32, n_heads: 2, n_layers: 1, residual: standard, causal: true}
train: {steps: 6, batch_size: 4, lr: 0.003, warmup_steps: 2, eval_every: 3, threads: 1, timeout_s: 120}
eval: {batches: 1, batch_size: 4}
variants:
  - {name: full, shared_qk: true, label: full}
  - {name: lsh, n_hashes: [1, 2], bucket_size: 8, label: "LSH-{n_hashes}"}
eval_variants:
  - {name: full, shared_qk: true, label: full}
  - {name: lsh, n_hashes: [4, 1], bucket_size: 8, label: "LSH-{n_hashes}"}
cpu:
  train: {steps: 4}
"""


def write(tmp_path: Path, text: str, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def replace(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


def test_valid_suite_expands_into_training_cells(tmp_path):
    suite = load_suite(write(tmp_path, BASE), device="cpu")
    cells = suite.cells()
    assert [c.variant.label for c in cells] == ["full", "LSH-1", "LSH-2"]
    assert [e.label for e in cells[0].eval_variants] == ["full", "LSH-4", "LSH-1"]
    assert cells[0].train["steps"] == 4  # cpu override
    assert cells[1].variant.params == {"n_hashes": 1, "bucket_size": 8}
    assert cells[0].model["max_seq_len"] == 32 and cells[0].model["vocab_size"] == 16  # from the task
    assert len({c.key("v1") for c in cells}) == 3 and cells[0].key("v1") != cells[0].key("v2")
    row = cells[1].to_row()
    assert row["train_variant"] == "LSH-1" and row["n_hashes"] == 1 and row["seq_len"] == 32
    assert load_suite(write(tmp_path, BASE), device="cuda").cells()[0].train["steps"] == 6


def test_shipped_quality_suites_are_valid():
    for name in ("duplication", "hashes", "reversible", "shared_qk"):
        path = ROOT / "suites" / f"{name}.yaml"
        for device in ("cpu", "cuda"):
            suite = load_suite(path, device=device)
            assert suite.kind == "quality" and suite.cells()
    assert load_suite(ROOT / "suites" / "smoke.yaml", device="cpu").kind == "benchmark"
    table2 = load_suite(ROOT / "suites" / "duplication.yaml", device="cpu").cells()
    assert [c.variant.label for c in table2] == ["full", "full-dot", "LSH-4", "LSH-2", "LSH-1"]  # paper row order
    assert [e.label for e in table2[0].eval_variants] == ["full", "full-dot", "full-unmasked", "LSH-8", "LSH-4", "LSH-2", "LSH-1"]
    paper = load_suite(ROOT / "suites" / "duplication.yaml", device="cuda").cells()
    assert paper[0].seq_len == 1024 and paper[0].model["d_model"] == 256 and paper[0].task["vocab_size"] == 128


@pytest.mark.parametrize(
    "old, new, path, problem",
    [
        ("eval: {batches: 1", "eval: {batchs: 1", "eval.batchs", "unknown key 'batchs' (did you mean 'batches'?)"),
        ("lr: 0.003", "lr: 3e-3", "train.lr", "write 3.0e-3 or 0.003"),
        ("eval_every: 3,", "eval_every: 0,", "train.eval_every", "greater than or equal to 1"),
        ("warmup_steps: 2,", "warmup_steps: 2, schedule: linear,", "train.schedule", "'cosine', 'inverse_sqrt' or 'constant'"),
        ("name: duplication", "name: duplicatoin", "task.name", "did you mean 'duplication'"),
        ("vocab_size: 16}", "vocab_size: 16, length: 3}", "task.length", "unknown key 'length'"),
        ("d_ff: 32,", "d_ff: 32, dff: 3,", "model.dff", "unknown model key 'dff'"),
        (
            "n_hashes: [1, 2], bucket_size: 8",
            "n_hashes: [1, 2], bucket_size: 12",
            "variants[1].bucket_size",
            "seq_len=32 is not a multiple of bucket_size=12",
        ),
        ("n_hashes: [1, 2], bucket", "n_hashes: [1, two], bucket", "variants[1].n_hashes[1]", "must be int"),
        ("{name: lsh, n_hashes: [4, 1]", "{name: lhs, n_hashes: [4, 1]", "eval_variants[1].name", "unknown variant 'lhs'"),
        (
            "  - {name: full, shared_qk: true, label: full}\n  - {name: lsh, n_hashes: [4",
            "  - {name: full, shared_qk: false, label: full}\n  - {name: lsh, n_hashes: [4",
            "eval_variants[0]",
            "cannot be evaluated with 'full'",
        ),
        ("kind: quality", "kind: qualty", "kind", "unknown suite kind 'qualty' (did you mean 'quality'?)"),
        ("cpu:\n  train: {steps: 4}", "cpu:\n  train: {stepz: 4}", "cpu.train.stepz", "unknown key 'stepz'"),
        ("cpu:\n  train: {steps: 4}", "cpu:\n  trian: {steps: 4}", "cpu.trian", "unknown key 'trian'"),
        ("lr: 0.003", "lr: .inf", "train.lr", "finite number"),
        ("threads: 1,", "threads: 100000,", "train.threads", "less than or equal to 1024"),
        (
            "task: {name: duplication, seq_len: 32, vocab_size: 16}",
            "task: {name: bytes, seq_len: 32, split: [.nan, 0.05, 0.05]}",
            "task.split[0]",
            "finite number",
        ),
    ],
)
def test_validation_errors_name_file_line_and_key_path(tmp_path, old, new, path, problem):
    file = write(tmp_path, replace(BASE, old, new))
    with pytest.raises(SuiteError) as error:
        load_suite(file, device="cpu")
    message = str(error.value)
    assert message.startswith(f"{file}:"), message
    assert error.value.line is not None and error.value.path == path, message
    assert problem in message, message


def test_cli_exits_2_on_a_bad_quality_suite(tmp_path, capsys):
    file = write(tmp_path, replace(BASE, "eval: {batches: 1", "eval: {batchs: 1"))
    assert main(["run", str(file), "--device", "cpu", "--out", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "eval.batchs" in err and f"{file}:" in err


def test_dry_run_lists_cells(tmp_path, capsys):
    assert main(["run", str(write(tmp_path, BASE)), "--device", "cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "LSH-2" in out and "3 quality cells on cpu" in out


def test_run_stores_curves_and_the_train_by_eval_grid(tmp_path, capsys):
    file = write(tmp_path, BASE)
    out = tmp_path / "results"
    argv = ["run", str(file), "--device", "cpu", "--out", str(out), "--filter", "train_variant != 'LSH-2'"]
    assert main(argv + ["--in-process"]) == 0
    frame = load(out / "tiny")
    run_dir = next((out / "tiny").iterdir())
    info = json.loads((run_dir / "run.json").read_text())
    assert info["kind"] == "quality" and info["environment"]["torch"] and "finished_at" in info
    curve = frame[frame["row_type"] == "curve"]
    assert sorted(curve.groupby("train_variant")["step"].apply(list).to_dict().items()) == [("LSH-1", [0, 3, 4]), ("full", [0, 3, 4])]
    assert {"train_bpd", "eval_bpd", "eval_accuracy", "wall_s", "tokens_seen"} <= set(curve.columns)
    evals = frame[frame["row_type"] == "eval"]
    assert len(evals) == 2 * 3 and evals["accuracy"].between(0, 100).all()
    assert set(evals["eval_variant"]) == {"full", "LSH-4", "LSH-1"} and frame["cell_key"].is_unique
    table = accuracy_table(frame)
    assert list(table.index) == ["full", "LSH-1"] and list(table.columns) == ["full", "LSH-4", "LSH-1"]
    assert (run_dir / "checkpoints").is_dir() and len(list((run_dir / "checkpoints").glob("*.pt"))) == 2
    printed = capsys.readouterr().out
    assert "trained with (rows) x evaluated with (columns)" in printed

    # resuming the same run skips finished cells; the missing one runs in its own process
    resume = ["run", str(file), "--device", "cpu", "--out", str(out), "--resume", run_dir.name]
    assert main(resume) == 0
    printed = capsys.readouterr().out
    assert "2 of 3 cells already done" in printed and "1/1 ETA" in printed and "LSH-2" in printed
    frame = load(out / "tiny")
    assert len(frame[frame["row_type"] == "eval"]) == 3 * 3


def test_missing_data_file_stops_the_run_before_it_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("REFORMER_ENWIK8", raising=False)
    file = write(
        tmp_path,
        replace(
            BASE,
            "task: {name: duplication, seq_len: 32, vocab_size: 16}",
            f"task: {{name: bytes, seq_len: 32, path: {tmp_path / 'enwik8'}}}",
        ),
    )
    file.write_text(file.read_text().replace("model: {", "model: {vocab_size: 256, "))
    out = tmp_path / "results"
    assert main(["run", str(file), "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'enwik8'}" in err and "mattmahoney.net" in err and not out.exists()


def test_a_training_run_whose_loss_diverges_is_an_error_row_not_ok(tmp_path, capsys):
    file = write(tmp_path, replace(replace(BASE, "lr: 0.003", "lr: 1.0e+30"), "warmup_steps: 2", "warmup_steps: 0, grad_clip: null"))
    out = tmp_path / "results"
    assert main(["run", str(file), "--device", "cpu", "--out", str(out), "--filter", "train_variant == 'full'"]) == 1
    frame = load(out / "tiny")
    train = frame[frame["row_type"] == "train"]
    assert train["status"].tolist() == ["error"] and "training diverged at step" in train["message"].iloc[0]
    assert "diverged at step" in capsys.readouterr().out


def test_a_cell_past_its_timeout_becomes_an_error_row(tmp_path, capsys):
    file = write(tmp_path, replace(BASE, "timeout_s: 120", "timeout_s: 0.2"))
    out = tmp_path / "results"
    assert main(["run", str(file), "--device", "cpu", "--out", str(out), "--filter", "train_variant == 'full'"]) == 0
    frame = load(out / "tiny")
    errors = frame[(frame["row_type"] == "train") & (frame["status"] != "ok")]
    assert len(errors) == 1 and errors["status"].iloc[0] == "timeout" and "timeout_s=0.2" in errors["message"].iloc[0]
    assert "TIMEOUT" in capsys.readouterr().out


LONG = """\
name: long
kind: quality
task: {name: duplication, seq_len: 32, vocab_size: 16}
model: {d_model: 32, d_ff: 32, n_heads: 2, n_layers: 1, residual: reversible, causal: true}
train: {steps: 200, batch_size: 4, lr: 0.003, warmup_steps: 2, eval_every: 40, checkpoint_every: 40, threads: 1, timeout_s: 300}
eval: {batches: 1, batch_size: 4}
variants:
  - {name: lsh, n_hashes: 2, bucket_size: 8, label: LSH-2}
"""


def _training_numbers(run_dir: Path) -> dict:
    """cell_key -> the numbers of each curve and eval row (what an exact resume must reproduce)."""
    columns = ("step", "train_bpd", "eval_bpd", "eval_accuracy", "accuracy")

    def plain(value):  # NaN (no accuracy for this row type) compares equal to itself as None
        return None if isinstance(value, float) and value != value else value

    return {r["cell_key"]: tuple(plain(r.get(c)) for c in columns) for r in load(run_dir).to_dict("records")}


@pytest.fixture(scope="module")
def uninterrupted_long_run(tmp_path_factory) -> Path:
    """The run folder of LONG trained without interruption (the reference of an exact resume)."""
    folder = tmp_path_factory.mktemp("reference")
    suite = write(folder, LONG, "long.yaml")
    command = [sys.executable, "-m", "harness", "run", str(suite), "--device", "cpu", "--out", str(folder / "out")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (folder / "out" / "long").iterdir()
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_a_training_run_cleanly_and_resume_is_exact(tmp_path, how, uninterrupted_long_run):
    suite = write(tmp_path, LONG, "long.yaml")
    command = [sys.executable, "-m", "harness", "run", str(suite), "--device", "cpu"]
    out = tmp_path / "out"
    process = subprocess.Popen(
        [*command, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    try:
        for line in process.stdout:
            if " step " in line and int(line.split(" step ")[1].split()[0]) >= 80:  # trained past a checkpoint
                break
        children = psutil.Process(process.pid).children(recursive=True)
        assert children, "the training cell runs in a process of its own"
        began = time.monotonic()
        if how == "SIGTERM":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130 and time.monotonic() - began < 15, err
    assert "Traceback" not in err and "--resume" in err
    psutil.wait_procs(children, timeout=5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]  # no orphan
    (run_dir,) = (out / "long").iterdir()
    assert "interrupted_at" in json.loads((run_dir / "run.json").read_text())
    resume = err.split("Continue with: ")[1].strip().split()[3:]  # python -m harness <run ... --resume ID>
    resumed = subprocess.run([sys.executable, "-m", "harness", *resume], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _training_numbers(run_dir) == _training_numbers(uninterrupted_long_run)  # the same curve and final numbers


def test_a_training_suite_under_the_pool_executor_gives_the_rows_of_a_local_run(tmp_path, capsys):
    file = write(tmp_path, BASE)
    for executor in ("local", "pool"):  # two of the three cells: the pool runs them side by side
        extra = ["--executor", "pool", "--workers", "2"] if executor == "pool" else []
        only = ["--filter", "train_variant != 'LSH-2'"]
        assert main(["run", str(file), "--device", "cpu", "--out", str(tmp_path / executor), *only, *extra]) == 0
    local, pooled = (next((tmp_path / e / "tiny").iterdir()) for e in ("local", "pool"))
    assert _training_numbers(pooled) == _training_numbers(local)
    rows = load(pooled)
    assert len(rows[rows["row_type"] == "eval"]) == 2 * 3 and (rows[rows["row_type"] == "train"]["status"] == "ok").sum() == 2
    assert set(rows["threads"].dropna()) == {1}  # the suite's train.threads, in every worker
    assert json.loads((pooled / "run.json").read_text())["executor"] == "pool"
