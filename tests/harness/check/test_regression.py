"""harness.check.regression (and its verdicts, ratios, formats and baselines): regression checks
between synthetic runs built with RunStore."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness import cli
from harness.check.baseline import promote_baseline
from harness.check.formats import format_markdown, format_text
from harness.check.regression import run_check
from harness.check.rules import ChecksSpec, parse_checks
from harness.check.verdicts import IMPROVEMENT, INCONCLUSIVE, MISSING, NEW, REGRESSION, SAME, CheckError, compare_samples
from harness.store.schema import config_key as config_key_of
from harness.store.writer import RunStore
from harness.suites import SuiteError, load_suite

REPO = Path(__file__).resolve().parents[3]
SUITE = """\
name: synthetic
device: cpu
workload: attention
mode: forward_backward
model: {d_model: 64, n_heads: 2, causal: false}
sweep:
  seq_len: [512, 1024]
  batch: [1]
variants:
  - {name: full}
  - {name: lsh, n_hashes: [2, 8], bucket_size: 32}
measure: {warmup: 1, min_repeats: 20, max_repeats: 20, min_time_s: 0.0}
"""
# Typical medians (ms) of the synthetic cells; only their relations matter.
BASE_MS = {
    ("full", 512): 20.0,
    ("full", 1024): 80.0,
    ("lsh n_hashes=2", 512): 15.0,
    ("lsh n_hashes=2", 1024): 30.0,
    ("lsh n_hashes=8", 512): 50.0,
    ("lsh n_hashes=8", 1024): 100.0,
}
NO_TIME = {"time": {"enabled": False}}


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "synthetic.yaml"
    path.write_text(SUITE)
    return load_suite(path).cells()


def samples(median_ms: float, rng: np.random.Generator, n: int = 20, iqr: float = 0.02) -> list[float]:
    """n lognormal samples around `median_ms` whose IQR is about `iqr` x median."""
    sigma = iqr / 1.349
    return (median_ms * np.exp(rng.normal(0.0, sigma, n))).tolist()


def make_run(
    root: Path,
    run_id: str,
    cells,
    *,
    seed: int = 0,
    scale: dict | None = None,
    iqr: float = 0.02,
    memory: dict | None = None,
    status: dict | None = None,
    extra: dict | None = None,
    device_name: str = "Test CPU 9000",
    suite_text: str = SUITE,
    code_version: str = "abc",
    cpu_scale: dict | None = None,
) -> Path:
    """A run folder of the synthetic cells: wall times from BASE_MS x scale[label] (or scale["*"]),
    CPU times from BASE_MS x cpu_scale[label], memory 100 MiB unless overridden, per-label status
    and extra columns."""
    rng = np.random.default_rng(seed)
    scale, memory, status, extra, cpu_scale = scale or {}, memory or {}, status or {}, extra or {}, cpu_scale or {}
    store = RunStore(root, "synthetic", run_id)
    store.write_run_info(
        {
            "suite": "synthetic",
            "suite_text": suite_text,
            "code_version": code_version,
            "environment": {"device_name": device_name, "device": "cpu", "torch": "2.13.0"},
            "finished_at": "2026-01-01T00:00:00+00:00",
        }
    )
    for cell in cells:
        label = cell.label
        times = samples(BASE_MS[(label, cell.seq_len)] * scale.get(label, scale.get("*", 1.0)), rng, iqr=iqr)
        row = {
            **cell.to_row(),
            "cell_key": cell.key(code_version),
            "code_version": code_version,
            "device_name": device_name,
            "status": status.get((label, cell.seq_len), "ok"),
            "message": "",
            "time_ms_samples": times,
            "time_ms_median": float(np.median(times)),
            "n_repeats": len(times),
            "peak_mem_mib": memory.get((label, cell.seq_len), 100.0),
            "cpu_time_ms_samples": samples(BASE_MS[(label, cell.seq_len)] * cpu_scale.get(label, cpu_scale.get("*", 1.0)), rng),
            **extra.get((label, cell.seq_len), {}),
        }
        if row["status"] != "ok":
            row.update(time_ms_samples=None, time_ms_median=None, peak_mem_mib=None, message="OutOfMemoryError: boom")
        store.append(row)
    return store.path


def verdicts(report, metric: str) -> dict[str, str]:
    return {c.cell: c.verdict for c in report.comparisons if c.metric == metric}


def checks_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "checks.yaml"
    path.write_text(json.dumps({"checks": data}))  # JSON is YAML
    return path


# --------------------------------------------------------------------------- time


def test_twenty_percent_slowdown_is_caught(tmp_path, cells):
    base = make_run(tmp_path, "base", cells, seed=1)
    run = make_run(tmp_path, "run", cells, seed=2, scale={"lsh n_hashes=2": 1.2})
    report = run_check(run, base, root=tmp_path)
    time = verdicts(report, "time_ms")
    assert time["lsh n_hashes=2 L=512"] == REGRESSION and time["lsh n_hashes=2 L=1024"] == REGRESSION
    assert time["full L=512"] == SAME and time["lsh n_hashes=8 L=1024"] == SAME
    assert report.exit_code == 1 and report.count(REGRESSION) == 2
    slow = next(c for c in report.comparisons if c.cell == "lsh n_hashes=2 L=512" and c.metric == "time_ms")
    assert slow.ratio == pytest.approx(1.2, rel=0.03) and slow.p_value < 1e-4


def test_five_percent_change_is_not_a_regression(tmp_path, cells):
    base = make_run(tmp_path, "base", cells, seed=1)
    run = make_run(tmp_path, "run", cells, seed=2, scale={"*": 1.05})
    report = run_check(run, base, root=tmp_path)
    assert set(verdicts(report, "time_ms").values()) == {SAME} and report.exit_code == 0


def test_improvement_is_reported_but_passes(tmp_path, cells):
    base = make_run(tmp_path, "base", cells, seed=1)
    run = make_run(tmp_path, "run", cells, seed=2, scale={"full": 0.7})
    report = run_check(run, base, root=tmp_path)
    assert verdicts(report, "time_ms")["full L=1024"] == IMPROVEMENT and report.exit_code == 0


def test_noise_of_ten_percent_iqr_rarely_trips_the_time_rule():
    rule = ChecksSpec().time
    alarms = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        base, now = samples(10.0, rng, 20, iqr=0.10), samples(10.0, rng, 20, iqr=0.10)
        alarms += compare_samples(now, base, rule.threshold, rule.p_value)[2] == REGRESSION
    assert alarms <= 3  # <= 1% false alarms; the effect-size threshold makes it far rarer in practice


def test_noise_through_the_whole_check(tmp_path, cells):
    for seed in range(5):
        base = make_run(tmp_path / str(seed), "base", cells, seed=100 + seed, iqr=0.10)
        run = make_run(tmp_path / str(seed), "run", cells, seed=200 + seed, iqr=0.10)
        assert run_check(run, base, root=tmp_path / str(seed)).exit_code == 0


def test_too_few_repeats_are_untested_not_flagged():
    ratio, p, verdict, note = compare_samples([12.0, 12.1, 12.2], [10.0, 10.1, 10.2], 0.10, 0.01)
    assert verdict == "untested" and "min_repeats" in note and ratio == pytest.approx(1.2, rel=0.01)


# --------------------------------------------------------------------------- status, memory, bpd


def test_status_change_is_always_a_regression(tmp_path, cells):
    base = make_run(tmp_path, "base", cells, seed=1)
    run = make_run(tmp_path, "run", cells, seed=2, status={("full", 1024): "oom"})
    report = run_check(run, base, root=tmp_path, checks_file=checks_file(tmp_path, NO_TIME))
    status = [c for c in report.comparisons if c.metric == "status"]
    assert [(c.cell, c.baseline, c.now, c.verdict) for c in status] == [("full L=1024", "ok", "oom", REGRESSION)]
    assert "OutOfMemoryError" in status[0].note and report.exit_code == 1
    back = run_check(base, run, root=tmp_path)  # oom -> ok: an improvement
    assert [c.verdict for c in back.comparisons if c.metric == "status"] == [IMPROVEMENT] and back.exit_code == 0


def test_memory_threshold_and_floor(tmp_path, cells):
    memory = {("full", 512): 1000.0, ("full", 1024): 1000.0, ("lsh n_hashes=2", 512): 0.2}
    base = make_run(tmp_path, "base", cells, seed=1, memory=memory)
    grown = {("full", 512): 1015.0, ("full", 1024): 1030.0, ("lsh n_hashes=2", 512): 0.9, ("lsh n_hashes=8", 512): 90.0}
    run = make_run(tmp_path, "run", cells, seed=1, memory=grown)
    report = run_check(run, base, root=tmp_path)
    memory_verdicts = verdicts(report, "peak_mem_mib")
    assert memory_verdicts["full L=512"] == SAME  # +1.5% < 2%
    assert memory_verdicts["full L=1024"] == REGRESSION  # +3%
    assert memory_verdicts["lsh n_hashes=2 L=512"] == SAME  # +0.7 MiB: 350% but under the 1 MiB floor
    assert memory_verdicts["lsh n_hashes=8 L=512"] == IMPROVEMENT  # -10%
    assert report.exit_code == 1


def test_bpd_rule_applies_to_the_column_when_present(tmp_path, cells):
    bpd = lambda value: {("full", 512): {"eval_bpd": value}}  # noqa: E731
    base = make_run(tmp_path, "base", cells, seed=1, extra=bpd(2.50))
    same = make_run(tmp_path, "same", cells, seed=1, extra=bpd(2.505))
    worse = make_run(tmp_path, "worse", cells, seed=1, extra=bpd(2.60))
    assert verdicts(run_check(same, base, root=tmp_path), "eval_bpd") == {"full L=512": SAME}
    report = run_check(worse, base, root=tmp_path)
    assert verdicts(report, "eval_bpd") == {"full L=512": REGRESSION} and report.exit_code == 1
    assert "eval_bpd" not in {c.metric for c in run_check(base, base, root=tmp_path).comparisons if c.cell != "full L=512"}


def quality_run(root: Path, run_id: str, eval_bpd: dict, *, failed: tuple = (), train_rows: bool = True, steps: int = 40) -> Path:
    """A quality run of two training cells (LSH-2 evaluated with LSH-2 and full; full with full), rows
    written by hand: a curve per cell, an eval row per (train, eval) pair with bpd `eval_bpd[(train,
    eval)]`, a train row per cell (without `train_rows`, as runs stored before the train row existed).
    A cell in `failed` stores only its train row, status "error"."""
    store = RunStore(root, "quality", run_id)
    store.write_run_info({"suite": "quality", "kind": "quality", "code_version": "abc", "environment": {"device_name": "Test CPU 9000"}})
    params = {"LSH-2": ("lsh", '{"bucket_size":16,"n_hashes":2}'), "full": ("full", "{}")}
    for train, evaluated in (("LSH-2", ("LSH-2", "full")), ("full", ("full",))):
        name, variant_params = params[train]
        config = {
            "kind": "quality",
            "task": "text",
            "task_params": '{"name":"text","seq_len":128}',
            "seq_len": 128,
            "device": "cpu",
            "variant": name,
            "variant_label": train,
            "train_variant": train,
            "variant_params": variant_params,
            "train_config": json.dumps({"steps": steps, "lr": 0.003, "threads": 1}),
            "code_version": "abc",
        }
        key = f"{run_id}-{train}"
        if train in failed:
            store.append({**config, "row_type": "train", "cell_key": key, "status": "error", "message": "RuntimeError: boom"})
            continue
        for step, bpd in ((0, 8.0), (steps, 9.0)):  # a curve whose last point differs from the eval: never compared
            store.append(
                {
                    **config,
                    "row_type": "curve",
                    "cell_key": f"{key}-curve-{step}",
                    "train_key": key,
                    "status": "ok",
                    "step": step,
                    "eval_bpd": bpd,
                }
            )
        for other in evaluated:
            other_name, other_params = params[other]
            store.append(
                {
                    **config, "row_type": "eval", "cell_key": f"{key}-eval-{other}", "train_key": key, "status": "ok", "step": steps,
                    "eval_variant": other, "eval_variant_name": other_name, "eval_variant_params": other_params,
                    "eval_bpd": eval_bpd[(train, other)],
                }
            )  # fmt: skip
        if train_rows:
            store.append({**config, "row_type": "train", "cell_key": key, "status": "ok", "final_eval_bpd": eval_bpd[(train, train)]})
    return store.path


QUALITY_BPD = {("LSH-2", "LSH-2"): 3.0, ("LSH-2", "full"): 3.4, ("full", "full"): 2.9}


def test_quality_run_compares_each_evaluation_not_its_curve(tmp_path):
    base = quality_run(tmp_path, "base", QUALITY_BPD, train_rows=False)  # stored before train rows existed
    worse = quality_run(tmp_path, "worse", {**QUALITY_BPD, ("LSH-2", "full"): 3.45})
    report = run_check(worse, base, root=tmp_path)
    assert {(c.cell, c.metric): c.verdict for c in report.comparisons} == {
        ("LSH-2 L=128", "eval_bpd"): SAME,
        ("LSH-2 (eval full) L=128", "eval_bpd"): REGRESSION,
        ("full L=128", "eval_bpd"): SAME,
    }  # one comparison per evaluation: no time or memory rows, no curve rows
    assert report.exit_code == 1
    assert run_check(quality_run(tmp_path, "same", QUALITY_BPD), base, root=tmp_path).exit_code == 0


def test_quality_cell_that_failed_is_a_status_regression_and_other_training_is_new(tmp_path):
    base = quality_run(tmp_path, "base", QUALITY_BPD)
    report = run_check(quality_run(tmp_path, "failed", QUALITY_BPD, failed=("full",)), base, root=tmp_path)
    assert verdicts(report, "status") == {"full L=128": REGRESSION} and report.exit_code == 1
    with pytest.raises(CheckError, match="no cell"):  # other training settings are other cells
        run_check(quality_run(tmp_path, "longer", QUALITY_BPD, steps=80), base, root=tmp_path)


# --------------------------------------------------------------------------- ratios

RATIO = {
    "time": {"enabled": False},
    "ratios": [
        {
            "numerator": "variant_label == 'lsh n_hashes=8'",
            "denominator": "variant_label == 'full'",
            "at": "seq_len == 1024",
            "threshold": 0.25,
        }
    ],
}


def test_ratio_check_catches_a_2x_change_of_one_variant(tmp_path, cells):
    base = make_run(tmp_path, "base", cells, seed=1, iqr=0.05)
    slower_machine = make_run(tmp_path, "other", cells, seed=2, iqr=0.05, scale={"*": 1.5}, device_name="Other CPU")
    lsh_2x = make_run(tmp_path, "lsh2x", cells, seed=3, iqr=0.05, scale={"*": 1.5, "lsh n_hashes=8": 3.0}, device_name="Other CPU")
    rules = checks_file(tmp_path, RATIO)
    fine = run_check(slower_machine, base, root=tmp_path, any_device=True, checks_file=rules)
    ratios = [c for c in fine.comparisons if c.metric == "time ratio"]
    assert [c.verdict for c in ratios] == [SAME] and fine.exit_code == 0
    assert ratios[0].cell == "lsh n_hashes=8 L=1024 / full L=1024" and ratios[0].ratio == pytest.approx(1.0, abs=0.1)
    caught = run_check(lsh_2x, base, root=tmp_path, any_device=True, checks_file=rules)
    ratio = next(c for c in caught.comparisons if c.metric == "time ratio")
    assert ratio.verdict == REGRESSION and ratio.ratio == pytest.approx(2.0, rel=0.1) and ratio.p_value < 1e-4
    assert caught.exit_code == 1 and any("devices differ" in w for w in caught.warnings)


def test_cpu_time_ratio_ignores_wall_time_contention(tmp_path, cells):
    rules = checks_file(tmp_path, {**RATIO, "ratios": [{**RATIO["ratios"][0], "metric": "cpu_time"}]})
    base = make_run(tmp_path, "base", cells, seed=1)
    contended = make_run(tmp_path, "busy", cells, seed=2, scale={"lsh n_hashes=8": 2.5})  # wall time only
    report = run_check(contended, base, root=tmp_path, checks_file=rules)
    assert [(c.metric, c.verdict) for c in report.comparisons if "ratio" in c.metric] == [("cpu time ratio", SAME)]
    slower = make_run(tmp_path, "slow", cells, seed=3, cpu_scale={"lsh n_hashes=8": 2.0})
    caught = run_check(slower, base, root=tmp_path, checks_file=rules)
    assert [c.verdict for c in caught.comparisons if "ratio" in c.metric] == [REGRESSION]


def test_ratio_without_at_pairs_cells_by_length(tmp_path, cells):
    rules = {"time": {"enabled": False}, "ratios": [{"numerator": "variant == 'lsh'", "denominator": "variant == 'full'"}]}
    base = make_run(tmp_path, "base", cells, seed=1)
    report = run_check(make_run(tmp_path, "run", cells, seed=2), base, root=tmp_path, checks_file=checks_file(tmp_path, rules))
    names = [c.cell for c in report.comparisons if c.metric == "time ratio"]
    assert len(names) == 4 and "lsh n_hashes=2 L=512 / full L=512" in names and report.exit_code == 0


def test_bad_ratio_expression_is_unusable_input(tmp_path, cells):
    base = make_run(tmp_path, "base", cells, seed=1)
    rules = checks_file(tmp_path, {"ratios": [{"numerator": "no_such_column == 1", "denominator": "variant == 'full'"}]})
    with pytest.raises(CheckError, match="no_such_column"):
        run_check(base, base, root=tmp_path, checks_file=rules)


def test_a_ratio_whose_numerator_matches_no_cell_fails_loudly(tmp_path, cells, capsys):
    base = make_run(tmp_path, "base", cells, seed=1)
    for numerator in ("variant == 'lsh' and n_hashes == 3", "variant == 'nothing'"):
        rules = checks_file(tmp_path, {**NO_TIME, "ratios": [{"numerator": numerator, "denominator": "variant == 'full'"}]})
        with pytest.raises(CheckError, match="no numerator cell .* with a matching denominator cell"):
            run_check(base, base, root=tmp_path, checks_file=rules)  # it used to pass with nothing compared
        assert cli.main(["check", str(base), "--baseline", str(base), "--checks", str(rules)]) == 2
        assert "no numerator cell" in capsys.readouterr().err


# --------------------------------------------------------------------------- devices, baselines, input


def test_a_run_folder_with_a_link_or_special_file_is_not_promoted(tmp_path, cells):
    run = make_run(tmp_path, "linked", cells, seed=1)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "x.pt").symlink_to("/dev/zero")
    with pytest.raises(CheckError, match=r"x\.pt: a symlink; a run folder promoted to a baseline holds plain files only"):
        promote_baseline(run, "linked", root=tmp_path)
    (run / "checkpoints" / "x.pt").unlink()
    import os

    os.mkfifo(run / "checkpoints" / "x.pt")
    with pytest.raises(CheckError, match="not a regular file or folder"):
        promote_baseline(run, "linked", root=tmp_path)
    assert not (tmp_path / "baselines").exists() or not list((tmp_path / "baselines").rglob("linked"))


def test_a_checkpoint_with_a_pickle_gadget_is_not_promoted(tmp_path, cells):
    import torch

    from tests.harness.test_training import Gadget

    run = make_run(tmp_path, "gadget", cells, seed=1)
    (run / "checkpoints").mkdir()
    torch.save({"gadget": Gadget(tmp_path / "pwned")}, run / "checkpoints" / "k.pt")
    with pytest.raises(CheckError, match=r"k\.pt: cannot load checkpoint: .* never allowed to run code.*not promoted"):
        promote_baseline(run, "gadget", root=tmp_path)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "baselines").exists()
    torch.save({"model": {"w": torch.zeros(2)}}, run / "checkpoints" / "k.pt")  # tensors only: fine
    assert promote_baseline(run, "gadget", root=tmp_path).is_dir()


def test_a_device_name_cannot_steer_the_baseline_folder(tmp_path, cells):
    run = make_run(tmp_path, "steer", cells, seed=1, device_name="../../../../escape")
    dest = promote_baseline(run, "mine", root=tmp_path)
    assert dest == tmp_path / "baselines" / "escape" / "mine" and not (tmp_path.parent / "escape").exists()


def test_mismatched_devices_are_refused(tmp_path, cells):
    base = make_run(tmp_path, "base", cells, seed=1, device_name="NVIDIA H100 80GB HBM3")
    run = make_run(tmp_path, "run", cells, seed=2, device_name="NVIDIA A100-SXM4-40GB")
    with pytest.raises(CheckError) as error:
        run_check(run, base, root=tmp_path)
    message = str(error.value)
    assert "device mismatch" in message and "A100" in message and "H100" in message and "--any-device" in message
    assert run_check(run, base, root=tmp_path, any_device=True).exit_code == 0


def test_missing_baseline_names_where_it_looked(tmp_path, cells, capsys):
    run = make_run(tmp_path, "run", cells, seed=1)
    with pytest.raises(CheckError) as error:
        run_check(run, "ci_cpu", root=tmp_path)
    expected = tmp_path / "baselines" / "test-cpu-9000" / "ci_cpu"
    assert str(expected) in str(error.value) and "python -m harness baseline" in str(error.value)
    code = cli.main(["check", str(run), "--baseline", "ci_cpu", "--root", str(tmp_path)])
    assert code == 2 and str(expected) in capsys.readouterr().err
    assert cli.main(["check", str(run), "--baseline", str(tmp_path / "nowhere" / "x"), "--root", str(tmp_path)]) == 2


def test_promote_then_check_by_name(tmp_path, cells, capsys):
    run = make_run(tmp_path, "run", cells, seed=1)
    assert cli.main(["baseline", str(run), "--name", "nightly", "--root", str(tmp_path)]) == 0
    dest = tmp_path / "baselines" / "test-cpu-9000" / "nightly"
    assert {"run.json", "results.parquet", "cells", "baseline.json"} <= {p.name for p in dest.iterdir()}
    assert json.loads((dest / "baseline.json").read_text())["run_id"] == "run"
    with pytest.raises(CheckError, match="already exists"):
        promote_baseline(run, "nightly", root=tmp_path)
    assert promote_baseline(run, "nightly", root=tmp_path, force=True) == dest
    later = make_run(tmp_path, "later", cells, seed=2)
    capsys.readouterr()
    assert cli.main(["check", str(later), "--baseline", "nightly", "--root", str(tmp_path)]) == 0
    assert "PASS" in capsys.readouterr().out
    # another device finds it by name only with --any-device
    other = make_run(tmp_path, "other", cells, seed=2, device_name="Other CPU")
    with pytest.raises(CheckError, match="other-cpu"):
        run_check(other, "nightly", root=tmp_path)
    assert run_check(other, "nightly", root=tmp_path, any_device=True).baseline.path == dest


def test_unfinished_run_is_not_promoted_without_force(tmp_path, cells):
    run = make_run(tmp_path, "run", cells, seed=1)
    info = json.loads((run / "run.json").read_text())
    del info["finished_at"]
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(CheckError, match="did not finish"):
        promote_baseline(run, "x", root=tmp_path)
    assert promote_baseline(run, "x", root=tmp_path, force=True).is_dir()


def test_missing_and_new_cells_and_no_overlap(tmp_path, cells):
    base = make_run(tmp_path, "base", cells[:4], seed=1)
    run = make_run(tmp_path, "run", cells[2:], seed=2)
    report = run_check(run, base, root=tmp_path)
    assert report.count(MISSING) == 2 and report.count(NEW) == 2 and report.exit_code == 0
    only_new = make_run(tmp_path, "new", cells[4:], seed=2)
    with pytest.raises(CheckError, match="no cell"):
        run_check(only_new, make_run(tmp_path, "old", cells[:2], seed=1), root=tmp_path)


def test_rules_come_from_the_suite_text_of_the_run(tmp_path, cells):
    text = SUITE + "checks:\n  time: {enabled: false}\n  memory: {floor_mib: 5.0}\n"
    base = make_run(tmp_path, "base", cells, seed=1)
    run = make_run(tmp_path, "run", cells, seed=2, scale={"*": 2.0}, suite_text=text)
    report = run_check(run, base, root=tmp_path)
    assert report.rules.memory.floor_mib == 5.0 and "run.json" in report.rules_source
    assert report.exit_code == 0 and not verdicts(report, "time_ms")


def test_config_key_ignores_code_version_and_survives_parquet(tmp_path, cells):
    run = make_run(tmp_path, "run", cells, seed=1, code_version="v1")
    other = make_run(tmp_path, "other", cells, seed=1, code_version="v2")
    from harness.store.reader import load

    keys = {config_key_of(r) for r in load(run).to_dict("records")}
    assert keys == {config_key_of(r) for r in load(other).to_dict("records")} == {c.config_key() for c in cells}
    assert len(keys) == len(cells)


def test_output_formats(tmp_path, cells, capsys):
    base = make_run(tmp_path, "base", cells, seed=1)
    run = make_run(tmp_path, "run", cells, seed=2, scale={"full": 1.3})
    code = cli.main(["check", str(run), "--baseline", str(base), "--root", str(tmp_path), "--format", "json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and data["status"] == "fail" and data["counts"]["regression"] == 2
    assert {"cell", "metric", "baseline", "now", "ratio", "p_value", "verdict"} <= set(data["comparisons"][0])
    report = run_check(run, base, root=tmp_path)
    text, markdown = format_text(report), format_markdown(report)
    assert text.splitlines()[-1].startswith("FAIL: 2 regression(s)") and "REGRESSION" in text
    assert "| cell | metric |" in markdown and "**REGRESSION**" in markdown


# --------------------------------------------------------------------------- the checks schema


def test_checks_block_is_validated_in_the_suite(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SUITE + "checks:\n  memory: {flor_mib: 1}\n")
    with pytest.raises(SuiteError) as error:
        load_suite(path)
    assert "checks.memory" in str(error.value) and "floor_mib" in str(error.value) and "bad.yaml:14:" in str(error.value)
    path.write_text(
        SUITE
        + textwrap.dedent("""\
        checks:
          ratios:
            - {numerator: "variant_label == 'lsh n_hashes=4'", denominator: "variant == 'full'"}
        """)
    )
    with pytest.raises(SuiteError, match="selects no cell"):
        load_suite(path)
    with pytest.raises(Exception, match="threshold"):
        parse_checks({"time": {"threshold": -1}})


@pytest.mark.parametrize("name", ["ci_cpu", "ci_gpu"])
def test_ci_suites_load_with_their_checks(name):
    for device in ("cpu", "cuda"):
        suite = load_suite(REPO / "suites" / f"{name}.yaml", device=device)
        assert suite.checks is not None and suite.cells()
    cpu_checks = load_suite(REPO / "suites" / f"{name}.yaml", device="cpu").checks
    assert not cpu_checks.time.enabled and cpu_checks.memory.enabled and cpu_checks.ratios


# --------------------------------------------------------------------------- CPU time samples (what the CPU ratios use)


def test_cpu_timer_records_process_cpu_time_per_repeat():
    import time

    import torch

    from harness.measurement import TimingSettings, time_callable

    def spin() -> None:
        end = time.perf_counter() + 0.004
        while time.perf_counter() < end:
            pass

    settings = TimingSettings(warmup=0, min_repeats=4, max_repeats=4, min_time_s=0.0)
    busy = time_callable(spin, torch.device("cpu"), settings)
    idle = time_callable(lambda: time.sleep(0.004), torch.device("cpu"), settings)
    assert len(busy.cpu_samples_ms) == 4 and busy.as_row()["cpu_time_ms_samples"] == busy.cpu_samples_ms
    assert sum(busy.cpu_samples_ms) > 0.2 * sum(busy.samples_ms)  # spinning uses CPU (less than wall time on a busy machine)
    assert sum(idle.cpu_samples_ms) < 0.1 * sum(idle.samples_ms)  # sleeping does not


# --------------------------------------------------------------------------- contended cells


def test_a_contended_cell_is_inconclusive_never_a_pass_or_a_fail(tmp_path, cells, capsys):
    busy = {"contended": True, "contention": "CPU share 0.51 < 0.85; other processes 1.0 cores busy"}
    base = make_run(tmp_path, "base", cells, seed=1)
    run = make_run(tmp_path, "run", cells, seed=2, scale={"full": 1.5}, extra={("full", 512): busy, ("full", 1024): {"contended": False}})
    report = run_check(run, base, root=tmp_path)
    time = verdicts(report, "time_ms")
    assert time["full L=512"] == INCONCLUSIVE and time["full L=1024"] == REGRESSION  # the uncontended slowdown stands
    vague = next(c for c in report.comparisons if c.verdict == INCONCLUSIVE)
    assert vague.p_value is None and vague.note == f"contended, run: {busy['contention']}"
    assert verdicts(report, "peak_mem_mib")["full L=512"] == SAME  # memory is not moved by other load
    assert "1 inconclusive (contended cells: neither a pass nor a fail)" in report.summary()

    # contended in the baseline: the same; a wall-time ratio over a contended cell is inconclusive too
    ratio_rules = checks_file(tmp_path, {"ratios": [{**RATIO["ratios"][0], "at": "seq_len == 512"}]})
    flipped = run_check(
        base, make_run(tmp_path, "busy_base", cells, seed=3, extra={("full", 512): busy}), root=tmp_path, checks_file=ratio_rules
    )
    assert verdicts(flipped, "time_ms")["full L=512"] == INCONCLUSIVE and flipped.exit_code == 0
    assert [c.verdict for c in flipped.comparisons if c.metric == "time ratio"] == [INCONCLUSIVE]
    assert cli.main(["check", str(run), "--baseline", str(base), "--format", "json"]) == 1  # the regression at 1024
    data = json.loads(capsys.readouterr().out)
    assert data["counts"][INCONCLUSIVE] == 1


def test_a_target_over_a_contended_cell_is_inconclusive():
    from harness.analysis.targets import evaluate_targets, targets_pass
    from harness.check.rules import TargetRule
    from harness.check.targets import format_targets

    frame = pd.DataFrame(
        [
            {"variant": "lsh", "variant_label": "lsh", "seq_len": 1024, "batch": 1, "time_ms_median": 900.0, "peak_mem_mib": 1.0}
            | {"status": "ok", "contended": True, "contention": "CPU share 0.40 < 0.85"},
            {"variant": "lsh", "variant_label": "lsh", "seq_len": 2048, "batch": 1, "time_ms_median": 100.0, "peak_mem_mib": 1.0}
            | {"status": "ok", "contended": False},
        ]
    )
    table = evaluate_targets(frame, [TargetRule(numerator="variant == 'lsh'", metric="time", max=0.5)])
    assert table["inconclusive"].tolist() == [True, False] and table["met"].tolist() == [False, True]
    assert table["note"][0] == "inconclusive, contended: CPU share 0.40 < 0.85" and targets_pass(table)
    text = format_targets(table, "suite")
    assert "INCONCLUSIVE" in text and "1 of 2 met; 1 inconclusive (contended cells: neither met nor missed)" in text
    memory = evaluate_targets(frame, [TargetRule(numerator="variant == 'lsh'", metric="peak_mem", max=0.5)])
    assert not memory["inconclusive"].any() and not targets_pass(memory)  # memory targets are not timing
