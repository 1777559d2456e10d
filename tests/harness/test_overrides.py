"""--set PATH=VALUE overrides (harness.overrides, harness.suites.resolved) and --print-config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from harness import cli
from harness.overrides import Override, OverrideError, apply_overrides, parse_override, parse_overrides
from harness.suites import SuiteError, load_suite
from harness.suites.resolved import changed_cells, load_with_overrides, resume_problem

SUITE = """
name: tiny
device: cpu
model: {d_model: 32, n_heads: 2, causal: true}
sweep: {seq_len: [64, 128], batch: [1]}
variants:
  - {name: full}
  - {name: lsh, n_hashes: 1, bucket_size: 16}
measure: {warmup: 0, min_repeats: 1, min_time_s: 0.0}
cpu:
  model: {d_model: 48}
"""


@pytest.fixture
def suite_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(SUITE)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argument, path, value",
    [
        ("model.d_model=512", ("model", "d_model"), 512),
        ("sweep.seq_len=[1024, 2048]", ("sweep", "seq_len"), [1024, 2048]),
        ("variants.1.n_hashes=4", ("variants", 1, "n_hashes"), 4),
        ("variants[1].n_hashes=4", ("variants", 1, "n_hashes"), 4),
        ("measure.min_time_s=0.5", ("measure", "min_time_s"), 0.5),
        ("model.causal=false", ("model", "causal"), False),
        ("description=a b=c", ("description",), "a b=c"),
        ("variants.0={name: sdpa}", ("variants", 0), {"name": "sdpa"}),
    ],
)
def test_parse_override_reads_the_path_and_a_yaml_value(argument: str, path: tuple, value: object) -> None:
    override = parse_override(argument)
    assert override.path == path and override.value == value and override.text == argument


@pytest.mark.parametrize(
    "argument, problem",
    [
        ("model.d_model", "expected PATH=VALUE"),
        ("=3", "expected PATH=VALUE"),
        ("model..d_model=3", "bad key path"),
        ("0.d_model=3", "must start with a top-level key"),
        ("model.d_model=", "no value"),
        ("model.d_model=[1, 2", "invalid YAML"),
    ],
)
def test_unusable_arguments_are_named(argument: str, problem: str) -> None:
    with pytest.raises(OverrideError) as error:
        parse_override(argument)
    assert str(error.value).startswith(f"--set {argument}: ") and problem in str(error.value)


def test_a_yaml_bomb_in_a_value_is_refused_before_it_expands() -> None:
    bomb = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1]"] + ["*a"] * 8) + "]"
    with pytest.raises(OverrideError, match="anchors and aliases are not allowed"):
        parse_override(f"model.d_model={bomb}")
    deep = "[" * 100 + "]" * 100
    with pytest.raises(OverrideError, match="nested deeper"):
        parse_override(f"sweep.seq_len={deep}")


def test_apply_sets_nested_keys_list_items_and_creates_missing_mappings() -> None:
    data = {"model": {"d_model": 1}, "variants": [{"name": "full"}, {"name": "lsh"}]}
    apply_overrides(data, parse_overrides(["model.d_model=2", "variants.1.n_hashes=4", "measure.min_repeats=10"]))
    assert data == {"model": {"d_model": 2}, "variants": [{"name": "full"}, {"name": "lsh", "n_hashes": 4}], "measure": {"min_repeats": 10}}
    for argument, problem in [
        ("variants.2.n_hashes=1", "index 2 is out of range; variants has 2 entries (0 to 1)"),
        ("variants.name=x", "variants is a list"),
        ("model.0=1", "model is a mapping, not a list"),
        ("model.d_model.x=1", "model.d_model is the value 2"),
    ]:
        with pytest.raises(OverrideError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            apply_overrides(data, [parse_override(argument)])


def test_override_wins_over_the_device_block_and_reaches_the_cells(suite_file: Path) -> None:
    assert {c.model["d_model"] for c in load_suite(suite_file).cells()} == {48}  # the cpu: block
    suite = load_suite(suite_file, overrides=parse_overrides(["model.d_model=64", "variants.1.n_hashes=2", "sweep.seq_len=[32]"]))
    cells = suite.cells()
    assert {c.model["d_model"] for c in cells} == {64}
    assert [c.seq_len for c in cells] == [32, 32]
    assert cells[1].variant_params == {"n_hashes": 2, "bucket_size": 16}
    assert suite.resolved_config["model"]["d_model"] == 64 and suite.resolved_config["device"] == "cpu"


def test_overrides_of_the_device_block_apply_before_the_merge(suite_file: Path) -> None:
    suite = load_suite(suite_file, overrides=parse_overrides(["cpu.model.d_model=96"]))
    assert {c.model["d_model"] for c in suite.cells()} == {96}
    with pytest.raises(SuiteError) as error:  # the block's schema still applies to what --set puts in it
        load_suite(suite_file, overrides=parse_overrides(["cpu.bogus=1"]))
    assert "--set cpu.bogus=1" in str(error.value) and "unknown key 'bogus'" in str(error.value)


@pytest.mark.parametrize(
    "argument, expected",
    [
        ("model.d_model=wide", "--set model.d_model=wide: model.d_model: must be int, got 'wide'"),
        ("model.d_modle=64", "unknown model key 'd_modle' (did you mean 'd_model'?)"),
        ("measure.min_repeats=many", "--set measure.min_repeats=many: measure.min_repeats: Input should be a valid integer"),
        ("measure.min_repeat=3", "unknown key 'min_repeat' (did you mean 'min_repeats'?); allowed keys: warmup, min_repeats"),
        ("bogus=1", "--set bogus=1: bogus: unknown key 'bogus'; allowed keys: name, kind"),
        ("variants.1.n_hashes=two", "--set variants.1.n_hashes=two"),
        ("measure.float32_matmul_precision=low", "Input should be 'highest', 'high' or 'medium'"),
    ],
)
def test_the_validator_names_the_set_argument_the_key_and_what_is_allowed(suite_file: Path, argument: str, expected: str) -> None:
    with pytest.raises(SuiteError) as error:
        load_suite(suite_file, overrides=parse_overrides([argument]))
    assert str(error.value).startswith(f"{suite_file}: --set {argument}: ")
    assert expected in str(error.value)


def test_print_config_shows_the_resolved_suite_as_yaml(suite_file: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "run", str(suite_file), "--set", "model.d_model=128", "--set", "sweep.seq_len=[256]", "--print-config")
    assert code == 0
    config = yaml.safe_load(out)
    assert config["model"] == {"d_model": 128, "n_heads": 2, "causal": True}
    assert config["sweep"]["seq_len"] == [256] and config["device"] == "cpu" and "cpu" not in config
    assert "# --set model.d_model=128" in out


def test_smoke_suite_print_config_shows_the_change(capsys) -> None:
    code, out, _ = run_cli(capsys, "run", "suites/smoke.yaml", "--set", "model.d_model=128", "--print-config")
    assert code == 0 and yaml.safe_load(out)["model"]["d_model"] == 128


def test_dry_run_marks_the_cells_an_override_changes(suite_file: Path, tmp_path: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "run", str(suite_file), "--set", "variants.1.n_hashes=2", "--dry-run", "--out", str(tmp_path / "out"))
    assert code == 0
    lines = [line for line in out.splitlines() if line.strip().startswith(("changed", "full", "lsh"))]
    assert [line.split()[0] for line in lines] == ["full", "full", "changed", "changed"]
    assert "2 of 4 cells changed" in out
    assert not (tmp_path / "out").exists()
    suite, _ = load_with_overrides(suite_file, ["variants.1.n_hashes=2"])
    assert changed_cells(suite_file, None, suite.cells()) == [False, False, True, True]


def test_bad_set_exits_2_naming_it(suite_file: Path, capsys) -> None:
    for argv in (["--set", "model.d_model=wide"], ["--set", "nothing"], ["--set", "model.d_model=&a [1]"]):
        code, out, err = run_cli(capsys, "run", str(suite_file), *argv, "--dry-run")
        assert code == 2 and out == ""
        assert f"--set {argv[1]}" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "profile", str(suite_file), "--set", "model.d_model=wide")
    assert code == 2 and "--set model.d_model=wide" in err


def test_a_resume_refuses_overrides_that_change_its_cells(suite_file: Path) -> None:
    suite, overrides = load_with_overrides(suite_file, ["variants.1.n_hashes=2"])
    info = {"overrides": [o.as_record() for o in overrides]}
    assert resume_problem(suite_file, None, info, suite, overrides) is None
    plain, none = load_with_overrides(suite_file, [])
    problem = resume_problem(suite_file, None, info, plain, none)
    assert problem and "started with --set variants.1.n_hashes=2" in problem and "no --set changes its cells" in problem
    same, written_differently = load_with_overrides(suite_file, ["variants[1].n_hashes=2", "measure.warmup=0"])
    assert resume_problem(suite_file, None, info, same, written_differently) is None  # the same cells


def test_overrides_are_recorded_in_run_json(suite_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "results"
    code, _, err = run_cli(
        capsys,
        "run",
        str(suite_file),
        "--set",
        "sweep.seq_len=[32]",
        "--filter",
        "variant == 'full'",
        "--in-process",
        "--out",
        str(out),
    )
    assert code == 0, err
    (run_json,) = out.glob("tiny/*/run.json")
    info = json.loads(run_json.read_text())
    assert info["overrides"] == [{"set": "sweep.seq_len=[32]", "path": "sweep.seq_len", "value": [32]}]
    assert "--set 'sweep.seq_len=[32]'" in info["command"]
    environment = info["environment"]
    assert set(environment["numerics"]) == {"float32_matmul_precision", "tf32_cuda_matmul", "tf32_cudnn", "deterministic_algorithms"}
    assert set(environment["cpu_frequency"]) == {"governor", "boost"} and "optional_packages" in environment
    code, _, err = run_cli(capsys, "run", str(suite_file), "--resume", run_json.parent.name, "--out", str(out), "--in-process")
    assert code == 2 and "changes its cells" in err
    assert Override("a=1", ("a",), 1).as_record() == {"set": "a=1", "path": "a", "value": 1}


def test_the_suite_precision_reaches_the_cells_and_the_report_shows_the_settings(suite_file: Path, tmp_path: Path, capsys) -> None:
    import pandas as pd
    import torch

    from harness.report import render_report

    out = tmp_path / "results"
    before = torch.get_float32_matmul_precision()
    try:  # in-process: the cell sets this process's precision
        code, _, err = run_cli(
            capsys,
            "run",
            str(suite_file),
            "--set",
            "measure.float32_matmul_precision=medium",
            "--set",
            "sweep.seq_len=[32]",
            "--filter",
            "variant == 'full'",
            "--in-process",
            "--out",
            str(out),
        )
    finally:
        torch.set_float32_matmul_precision(before)
    assert code == 0, err
    (run_dir,) = out.glob("tiny/*")
    rows = pd.read_parquet(run_dir / "results.parquet")
    assert list(rows["float32_matmul_precision"]) == ["medium"] and list(rows["tf32_cuda_matmul"]) == [True]
    assert json.loads(rows["optional_packages"].iloc[0]) is not None
    report = (render_report([run_dir], out=tmp_path / "report", root=out) / "report.md").read_text()
    assert "| float32 matmul precision | medium |" in report
    assert "| TF32 (CUDA matmul / cuDNN) | True /" in report and "| deterministic algorithms | False |" in report
    assert "| CPU governor / boost |" in report and "optional packages installed" in report
    assert "--set measure.float32_matmul_precision=medium --set 'sweep.seq_len=[32]'" in report


def test_a_quality_suite_sets_the_precision_in_train(tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text(
        "kind: quality\ndevice: cpu\ntask: {name: duplication, seq_len: 16, vocab_size: 16}\n"
        "model: {d_model: 16, d_ff: 16, n_heads: 2, n_layers: 1}\ntrain: {steps: 2}\nvariants: [{name: full}]\n"
    )
    (plain,) = load_suite(path).cells()
    assert "float32_matmul_precision" not in plain.train  # unset: the cell's key is what it was before the setting
    (cell,) = load_suite(path, overrides=parse_overrides(["train.float32_matmul_precision=high"])).cells()
    assert cell.train["float32_matmul_precision"] == "high" and cell.key("v") != plain.key("v")
    with pytest.raises(SuiteError, match="--set train.float32_matmul_precision=low"):
        load_suite(path, overrides=parse_overrides(["train.float32_matmul_precision=low"]))


def test_a_training_cell_runs_and_records_with_the_suites_precision(tmp_path: Path, capsys) -> None:
    import pandas as pd
    import torch

    path = tmp_path / "q.yaml"
    path.write_text(
        "kind: quality\ndevice: cpu\ntask: {name: duplication, seq_len: 16, vocab_size: 16}\n"
        "model: {d_model: 16, d_ff: 16, n_heads: 2, n_layers: 1}\ntrain: {steps: 2, eval_every: 1, batch_size: 2}\n"
        "eval: {batches: 1, batch_size: 2}\nvariants: [{name: full}]\n"
    )
    before = torch.get_float32_matmul_precision()
    try:
        code = cli.main(["run", str(path), "--set", "train.float32_matmul_precision=medium", "--in-process", "--out", str(tmp_path / "r")])
    finally:
        torch.set_float32_matmul_precision(before)
    assert code == 0, capsys.readouterr().err
    (parquet,) = (tmp_path / "r").glob("q/*/results.parquet")
    rows = pd.read_parquet(parquet)
    curve = rows[rows["row_type"] == "curve"]
    assert len(curve) == 3 and set(curve["float32_matmul_precision"]) == {"medium"}
    # The optional packages the training cell imported are recorded as in benchmark rows (issue 33, item 2).
    import json
    from importlib import metadata

    from harness.store.schema import OPTIONAL_PACKAGES as OPTIONAL_PACKAGES_COLUMN

    trained = rows[rows["row_type"].isin(["curve", "eval"])]  # the rows the training cell writes itself
    assert len(trained) == 4 and trained[OPTIONAL_PACKAGES_COLUMN].notna().all()
    for text in trained[OPTIONAL_PACKAGES_COLUMN]:
        assert all(version == metadata.version(name) for name, version in json.loads(text).items())
