"""harness.suites (benchmark suites): expansion into cells, labels, overrides, keys, filters and error messages."""

from __future__ import annotations

import dataclasses
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from harness.cells.benchmark import BenchmarkCell, estimate_seconds
from harness.suites import SuiteError, filter_cells, load_suite

BASE = """\
name: demo
description: a small suite
dtype: float32
mode: forward_backward
workload: attention
model: {d_model: 64, n_heads: 2, d_ff: 128, n_layers: 1, causal: false}
sweep:
  seq_len: [2048, 1024, 4096]
  tokens_per_batch: [8192]
variants:
  - {name: full}
  - {name: sdpa}
  - {name: lsh, n_hashes: [1, 2, 4, 8], bucket_size: 64}
measure: {warmup: 1, min_repeats: 3}
cpu:
  sweep: {seq_len: [256, 512]}
  measure: {warmup: 0}
cuda:
  measure: {min_repeats: 10}
"""


def write(tmp_path: Path, text: str, name: str = "demo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_suite_expands_into_expected_cells(tmp_path):
    suite = load_suite(write(tmp_path, BASE), device="cuda")
    cells = suite.cells()
    assert (suite.name, suite.device, suite.description) == ("demo", "cuda", "a small suite")
    assert len(cells) == (1 + 1 + 4) * 3
    assert [c.seq_len for c in cells[:3]] == [1024, 2048, 4096]  # ascending within a variant
    assert all(c.batch == 8192 // c.seq_len and c.tokens_per_batch == 8192 for c in cells)
    labels = list(dict.fromkeys(c.label for c in cells))  # first-seen order
    assert labels == ["full", "sdpa", "lsh n_hashes=1", "lsh n_hashes=2", "lsh n_hashes=4", "lsh n_hashes=8"]
    lsh = [c for c in cells if c.variant == "lsh"]
    assert [c.variant_params["n_hashes"] for c in lsh[::3]] == [1, 2, 4, 8]
    assert all(c.variant_params == {"n_hashes": c.variant_params["n_hashes"], "bucket_size": 64} for c in lsh)
    # model keys are complete, defaults filled in from ReformerLMConfig
    assert cells[0].model["d_model"] == 64 and cells[0].model["causal"] is False
    assert {"vocab_size", "residual", "ffn_chunks", "max_seq_len"} <= set(cells[0].model)
    assert cells[0].measure["warmup"] == 1 and cells[0].measure["min_repeats"] == 10  # cuda override


def test_cpu_override_applies_only_on_cpu(tmp_path):
    path = write(tmp_path, BASE)
    cpu = load_suite(path, device="cpu").cells()
    assert sorted({c.seq_len for c in cpu}) == [256, 512]
    assert all(c.device == "cpu" and c.measure["warmup"] == 0 and c.measure["min_repeats"] == 3 for c in cpu)
    assert all(c.batch == 8192 // c.seq_len for c in cpu)
    cuda = load_suite(path, device="cuda").cells()
    assert sorted({c.seq_len for c in cuda}) == [1024, 2048, 4096]


def test_batch_and_model_sweep(tmp_path):
    text = BASE.replace("tokens_per_batch: [8192]", "batch: [2, 1]\n  n_layers: [1, 2]")
    cells = load_suite(write(tmp_path, text), device="cuda").cells()
    assert len(cells) == 6 * 2 * 2 * 3
    first = cells[:12]  # variant `full`: batch, then n_layers, then seq_len ascending
    assert [(c.batch, c.model["n_layers"], c.seq_len) for c in first[:4]] == [(2, 1, 1024), (2, 1, 2048), (2, 1, 4096), (2, 2, 1024)]
    assert all(c.tokens_per_batch is None for c in cells)


def test_auto_labels_list_only_what_varies(tmp_path):
    text = BASE.replace(
        "  - {name: lsh, n_hashes: [1, 2, 4, 8], bucket_size: 64}",
        "  - {name: lsh, n_hashes: 2}\n  - {name: lsh, n_hashes: 2, bucket_size: 32}\n"
        "  - {name: full, shared_qk: [false, true], label: mine}",
    )
    cells = load_suite(write(tmp_path, text), device="cuda").cells()
    labels = list(dict.fromkeys(c.label for c in cells))
    # the labelled entry counts too: the plain `full` differs from it in shared_qk
    assert labels == [
        "full shared_qk=False",
        "sdpa",
        "lsh bucket_size=64",
        "lsh bucket_size=32",
        "mine shared_qk=False",
        "mine shared_qk=True",
    ]
    single = BASE.replace("  - {name: lsh, n_hashes: [1, 2, 4, 8], bucket_size: 64}", "  - {name: lsh, n_hashes: 2}")
    assert {c.label for c in load_suite(write(tmp_path, single), device="cuda").cells()} == {"full", "sdpa", "lsh"}


def test_keys_are_stable_and_sensitive(tmp_path):
    path = write(tmp_path, BASE)
    a, b = load_suite(path, device="cpu").cells(), load_suite(path, device="cpu").cells()
    assert [c.key("v1") for c in a] == [c.key("v1") for c in b]
    assert len({c.key("v1") for c in a}) == len(a)
    cell = a[-1]
    assert len(cell.key("v1")) == 16
    assert cell.key("v1") != cell.key("v2")
    changes = [
        {"seq_len": 999},
        {"batch": 7},
        {"dtype": "float16"},
        {"model": {**cell.model, "d_ff": 256}},
        {"variant_params": {**cell.variant_params, "bucket_size": 32}},
        {"measure": {**cell.measure, "warmup": 5}},
    ]
    for change in changes:
        assert dataclasses.replace(cell, **change).key("v1") != cell.key("v1"), change


def test_group_key_ignores_seq_len(tmp_path):
    cells = load_suite(write(tmp_path, BASE), device="cuda").cells()
    full = [c for c in cells if c.label == "full"]
    assert len({c.seq_len for c in full}) == 3 and len({c.group_key() for c in full}) == 1
    assert len({c.group_key() for c in cells}) == 6  # one per variant expansion


def test_a_variant_entry_can_replace_the_seq_len_sweep(tmp_path):
    text = BASE.replace("bucket_size: 64}", "bucket_size: 64, seq_len: [65536, 4096]}").replace("[8192]", "[65536]")
    cells = load_suite(write(tmp_path, text), device="cuda").cells()
    lengths = {label: [c.seq_len for c in cells if c.label == label] for label in dict.fromkeys(c.label for c in cells)}
    assert lengths["full"] == lengths["sdpa"] == [1024, 2048, 4096]
    assert lengths["lsh n_hashes=1"] == lengths["lsh n_hashes=8"] == [4096, 65536]
    assert all("seq_len" not in c.variant_params for c in cells)


def test_row_and_attention_params(tmp_path):
    cell = load_suite(write(tmp_path, BASE), device="cuda").cells()[-1]
    row = cell.to_row()
    assert row["variant"] == "lsh" and row["variant_label"] == "lsh n_hashes=8"
    assert row["n_hashes"] == 8 and row["bucket_size"] == 64 and row["seq_len"] == 4096 and row["batch"] == 2
    assert row["variant_params"] == '{"bucket_size":64,"n_hashes":8}'
    assert row["d_model"] == 64 and row["workload"] == "attention"
    assert cell.attention_params() == {"d_model": 64, "n_heads": 2, "causal": False, "n_hashes": 8, "bucket_size": 64}


def test_filter_cells(tmp_path):
    cells = load_suite(write(tmp_path, BASE), device="cuda").cells()
    picked = filter_cells(cells, "variant == 'lsh' and seq_len <= 2048 and n_hashes > 1")
    assert [(c.label, c.seq_len) for c in picked] == [(f"lsh n_hashes={n}", length) for n in (2, 4, 8) for length in (1024, 2048)]
    with pytest.raises(SuiteError) as error:
        filter_cells(cells, "no_such_column > 3")
    assert "no_such_column" in str(error.value) and "seq_len" in str(error.value)
    with pytest.raises(SuiteError):
        filter_cells(cells, "seq_len >>> 3")


def test_estimate_is_positive_and_grows_with_length(tmp_path):
    cells = [c for c in load_suite(write(tmp_path, BASE), device="cpu").cells() if c.variant == "full"]
    estimates = [estimate_seconds(c) for c in cells]
    assert all(e >= 3.0 for e in estimates) and estimates == sorted(estimates)


def test_matmul_rate_is_an_opt_in_measure_setting(tmp_path):
    off = load_suite(write(tmp_path, BASE), device="cpu").cells()
    assert all(c.measure["matmul_rate"] is False for c in off)
    on = load_suite(
        write(tmp_path, BASE.replace("measure: {warmup: 0}", "measure: {warmup: 0, matmul_rate: true}"), name="on.yaml"), device="cpu"
    ).cells()
    assert all(c.measure["matmul_rate"] is True for c in on)  # set in the cpu: block, used on CPU
    assert [c.key("v") for c in on] != [c.key("v") for c in off] and [c.config_key() for c in on] == [c.config_key() for c in off]
    assert estimate_seconds(on[0]) > estimate_seconds(off[0])  # the probe's time budget is counted
    with pytest.raises(SuiteError) as error:
        load_suite(
            write(tmp_path, BASE.replace("measure: {warmup: 0}", "measure: {warmup: 0, matmul_rate: 1}"), name="int.yaml"), device="cpu"
        )
    assert ": cpu.measure.matmul_rate: " in str(error.value) and "valid boolean" in str(error.value)


# --------------------------------------------------------------------------- errors

# (edit of BASE, key path in the message, text naming what is allowed)
ERRORS = {
    "unknown top-level key": (lambda s: s + "colour: red\n", "colour", "allowed keys: name, kind, description"),
    "unknown measure key": (lambda s: s.replace("warmup: 1", "warmups: 1"), "measure.warmups", "min_repeats"),
    "unknown override key": (lambda s: s + "  swep: {}\n", "cuda.swep", "allowed keys: dtype"),
    "unknown variant": (
        lambda s: s.replace("{name: sdpa}", "{name: spda}"),
        "variants[1].name",
        "full, hf_lsh, linear, linformer, local, lsh, performer, reformer_pytorch_lsh, sdpa",
    ),
    "unknown variant param": (lambda s: s.replace("bucket_size: 64", "bucket_sise: 64"), "variants[2].bucket_sise", "bucket_size (int"),
    "wrong param type in list": (lambda s: s.replace("[1, 2, 4, 8]", "[1, two, 4]"), "variants[2].n_hashes[1]", "n_hashes (int"),
    "wrong param type": (lambda s: s.replace("bucket_size: 64", "bucket_size: 1.5"), "variants[2].bucket_size", "must be int"),
    "inconsistent param": (lambda s: s.replace("bucket_size: 64", "bucket_size: 0"), "variants[2].bucket_size", "must be positive"),
    "model key in variant": (lambda s: s.replace("{name: full}", "{name: full, d_model: 32}"), "variants[0].d_model", "model.d_model"),
    "empty sweep list": (lambda s: s.replace("[2048, 1024, 4096]", "[]"), "sweep.seq_len", "at least one"),
    "empty variants": (
        lambda s: s.split("variants:")[0] + "variants: []\n",
        "variants",
        "full, hf_lsh, linear, linformer, local, lsh, performer, reformer_pytorch_lsh, sdpa",
    ),
    "seq_len missing": (lambda s: s.replace("  seq_len: [2048, 1024, 4096]\n", ""), "sweep.seq_len", "seq_len: ["),
    "batch and tokens": (
        lambda s: s.replace("  tokens_per_batch", "  batch: [1]\n  tokens_per_batch"),
        "sweep.tokens_per_batch",
        "either batch or tokens_per_batch",
    ),
    "not divisible": (lambda s: s.replace("[8192]", "[10000]"), "sweep.tokens_per_batch[0]", "multiple of every seq_len"),
    "unknown sweep key": (
        lambda s: s.replace("  tokens_per_batch", "  seqlen: [1]\n  tokens_per_batch"),
        "sweep.seqlen",
        "seq_len, batch, tokens_per_batch",
    ),
    "unknown model key": (lambda s: s.replace("causal: false}", "causal: false, depth: 2}"), "model.depth", "n_layers (int"),
    "wrong model type": (lambda s: s.replace("n_heads: 2,", "n_heads: '2',"), "model.n_heads", "int"),
    "wrong swept model value": (
        lambda s: s.replace("  tokens_per_batch", "  residual: [standard, revers]\n  tokens_per_batch"),
        "sweep.residual[1]",
        "reversible, standard",
    ),
    "bad enum": (lambda s: s.replace("mode: forward_backward", "mode: backward"), "mode", "'forward', 'forward_backward'"),
    "bad dtype": (lambda s: s.replace("dtype: float32", "dtype: fp8"), "dtype", "'bfloat16'"),
    "sweep not a list": (lambda s: s.replace("[8192]", "8192"), "sweep.tokens_per_batch", "list of values"),
    "entry seq_len not a list": (
        lambda s: s.replace("bucket_size: 64}", "bucket_size: 64, seq_len: 4096}"),
        "variants[2].seq_len",
        "replacing sweep.seq_len",
    ),
    "entry seq_len bad value": (
        lambda s: s.replace("bucket_size: 64}", "bucket_size: 64, seq_len: [1024, 0]}"),
        "variants[2].seq_len[1]",
        "distinct positive integers",
    ),
    "entry seq_len not divisible": (
        lambda s: s.replace("bucket_size: 64}", "bucket_size: 64, seq_len: [1024, 3000]}"),
        "sweep.tokens_per_batch[0]",
        "variants[2].seq_len[1]",
    ),
    "bucket_size does not divide seq_len": (
        lambda s: s.replace("bucket_size: 64}", "bucket_size: 64, seq_len: [1024, 1000]}").replace(
            "tokens_per_batch: [8192]", "batch: [1]"
        ),
        "variants[2].seq_len[1]",
        "seq_len=1000 is not a multiple of bucket_size=64",
    ),
    "matmul_rate not a bool": (
        lambda s: s.replace("min_repeats: 3}", "min_repeats: 3, matmul_rate: 'true'}"),
        "measure.matmul_rate",
        "valid boolean",
    ),
    "matmul_rate misspelt": (
        lambda s: s.replace("min_repeats: 3}", "min_repeats: 3, matmul_rates: true}"),
        "measure.matmul_rates",
        "did you mean 'matmul_rate'",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_name_file_key_path_and_what_is_allowed(tmp_path, case):
    edit, key_path, allowed = ERRORS[case]
    path = write(tmp_path, edit(BASE), name="broken_suite.yaml")
    with pytest.raises(SuiteError) as error:
        load_suite(path, device="cuda")
    message = str(error.value)
    assert "broken_suite.yaml" in message, message
    assert f": {key_path}: " in message, message
    assert allowed in message, message


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize(
    "edit, marker",
    [
        (lambda s: s.replace("measure: {warmup: 1", "measure: {bogus: 1, warmup: 1"), "bogus"),
        (lambda s: s.replace("{name: sdpa}", "{name: nope}"), "nope"),
        (lambda s: s.replace("  measure: {warmup: 0}", "  measure: {warmup: 0}\n  flavour: 1"), "flavour"),
        (lambda s: s.replace("[1, 2, 4, 8]", "[1, 2,\n      x]"), "      x]"),
    ],
)
def test_errors_carry_the_line_number(tmp_path, edit, marker):
    path = write(tmp_path, edit(BASE), name="lines.yaml")
    with pytest.raises(SuiteError) as error:
        load_suite(path, device="cpu")
    line = line_of(path, marker)
    assert f"lines.yaml:{line}: " in str(error.value), str(error.value)
    assert error.value.line == line


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "name: x\nsweep: {seq_len: [1, 2}\nvariants: []\n", name="syntax.yaml")
    with pytest.raises(SuiteError) as error:
        load_suite(path)
    assert "syntax.yaml:2: invalid YAML" in str(error.value)


def test_override_errors_point_into_the_override_block(tmp_path):
    path = write(tmp_path, BASE.replace("sweep: {seq_len: [256, 512]}", "sweep: {seq_len: [256, 0]}"), name="o.yaml")
    with pytest.raises(SuiteError) as error:
        load_suite(path, device="cpu")
    assert f"o.yaml:{line_of(path, '[256, 0]')}: cpu.sweep.seq_len[1]: " in str(error.value)
    load_suite(path, device="cuda")  # the cpu block is not used on cuda


def test_missing_file_and_bad_device(tmp_path):
    with pytest.raises(SuiteError, match="not found"):
        load_suite(tmp_path / "absent.yaml")
    with pytest.raises(SuiteError, match="auto, cpu, cuda"):
        load_suite(write(tmp_path, BASE), device="tpu")


def test_cells_are_frozen(tmp_path):
    cell = load_suite(write(tmp_path, BASE), device="cpu").cells()[0]
    assert isinstance(cell, BenchmarkCell)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cell.seq_len = 1  # type: ignore[misc]


MODELS = """\
name: models
workload: model
mode: train_step
model: {d_model: 64, n_heads: 2, d_ff: 128, n_layers: 1, vocab_size: 256, residual: reversible, causal: true}
sweep: {seq_len: [256], batch: [1]}
variants:
  - {name: lsh, n_hashes: 2, bucket_size: 32}
  - {name: lsh, n_hashes: 2, bucket_size: 32, model_variant: hf_reformer_lm}
"""


def test_a_variant_entry_chooses_the_model_a_model_cell_builds(tmp_path):
    ours, hf = load_suite(write(tmp_path, MODELS), device="cpu").cells()
    assert "model_variant" not in ours.model and hf.model["model_variant"] == "hf_reformer_lm"
    assert hf.label == "hf_reformer_lm lsh" and ours.label == "lsh"  # auto labels tell them apart
    assert hf.config_key() != ours.config_key() and hf.key("v") != ours.key("v")
    explicit = load_suite(
        write(tmp_path, MODELS.replace("bucket_size: 32}\n  -", "bucket_size: 32, model_variant: reformer_lm, label: ours}\n  -")),
        device="cpu",
    )
    assert explicit.cells()[0].config_key() == ours.config_key()  # naming ours changes no baseline match


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (
            "model_variant: hf_reformer_lm",
            "model_variant: hf_reformer",
            "unknown model variant 'hf_reformer' (did you mean 'hf_reformer_lm'?)",
        ),
        ("workload: model", "workload: block", "model_variant chooses the LM of workload 'model'"),
        ("causal: true}", "causal: true, ffn_chunks: 3}", "hf_reformer_lm: seq_len=256 is not a multiple of ffn_chunks=3"),
    ],
)
def test_a_bad_model_variant_is_a_suite_error_at_its_key(tmp_path, old, new, problem):
    with pytest.raises(SuiteError) as error:
        load_suite(write(tmp_path, MODELS.replace(old, new)), device="cpu")
    assert problem in str(error.value) and "variants[1]" in str(error.value) or "workload" in problem, str(error.value)


LIMITS = {
    "memory_limit_gib .inf": (
        lambda s: s.replace("measure: {warmup: 1,", "measure: {memory_limit_gib: .inf, warmup: 1,"),
        "measure.memory_limit_gib",
        "finite number",
    ),
    "min_time_s .nan": (
        lambda s: s.replace("measure: {warmup: 1,", "measure: {min_time_s: .nan, warmup: 1,"),
        "measure.min_time_s",
        "finite number",
    ),
    "threads above 1024": (lambda s: s.replace("measure: {warmup: 1,", "measure: {threads: 100000, warmup: 1,"), "measure.threads", "1024"),
    "rounds 1e9": (lambda s: s.replace("measure: {warmup: 1,", "measure: {rounds: 1000000000, warmup: 1,"), "measure.rounds", "1000"),
    "repeats 1e9": (lambda s: s.replace("min_repeats: 3}", "min_repeats: 3, max_repeats: 1000000000}"), "measure.max_repeats", "100000"),
    "timeout a year": (
        lambda s: s.replace("measure: {warmup: 1,", "measure: {timeout_s: 31536000.0, warmup: 1,"),
        "measure.timeout_s",
        "604800",
    ),
}


@pytest.mark.parametrize("case", sorted(LIMITS))
def test_settings_are_finite_and_bounded(tmp_path, case):
    edit, key_path, allowed = LIMITS[case]
    path = write(tmp_path, edit(BASE))
    with pytest.raises(SuiteError) as error:
        load_suite(path, device="cuda")
    assert f": {key_path}: " in str(error.value) and allowed in str(error.value), str(error.value)


def huge_suite(path: Path, seq_lens: int, batches: int, entries: int, n_hashes: list[int] | int = 2) -> Path:
    entry = {"name": "lsh", "n_hashes": n_hashes, "bucket_size": 32}
    suite = {
        "name": "huge",
        "device": "cpu",
        "model": {"d_model": 64, "n_heads": 2},
        "sweep": {"seq_len": [64 * (i + 1) for i in range(seq_lens)], "batch": list(range(1, batches + 1))},
        "variants": [
            {
                **entry,
                "n_hashes": n_hashes[:] if isinstance(n_hashes, list) else n_hashes,
                "label": f"v{i}" + ("-{n_hashes}" if isinstance(n_hashes, list) else ""),
            }
            for i in range(entries)
        ],  # a copy per entry: PyYAML would write a shared list as an anchor
    }
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def test_a_huge_sweep_is_refused_from_its_sizes_before_expansion(tmp_path, capsys):
    from harness.cli import main
    from harness.suites.common import MAX_CELLS

    path = huge_suite(tmp_path / "huge.yaml", 100, 100, 100)
    begin = time.monotonic()
    code = main(["run", str(path), "--dry-run", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert time.monotonic() - begin < 10  # it used to run for 300 s and 5.4 GB, then was killed
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
    assert "expands into 1,000,000 cells (100 seq_len x 100 batch per variant expansion" in err, err
    assert f"more than the {MAX_CELLS:,} allowed" in err and "--filter" in err
    # list-valued parameters multiply too
    huge_suite(path, 100, 1, 100, n_hashes=[1, 2, 4, 8, 16, 32, 64])
    assert main(["run", str(path), "--dry-run"]) == 2 and "expands into 70,000 cells" in capsys.readouterr().err
    # one long list is refused before its values are compared with each other
    huge_suite(path, 20_001, 1, 1)
    begin = time.monotonic()
    assert main(["run", str(path), "--dry-run"]) == 2 and "expands into 20,001 cells (20,001 values of seq_len)" in capsys.readouterr().err
    assert time.monotonic() - begin < 10
    huge_suite(path, 10, 10, 10)  # 1,000 cells: fine
    assert len(load_suite(path).cells()) == 1000


def test_timer_and_bandwidth_settings_leave_the_keys_of_suites_that_do_not_set_them(tmp_path):
    plain = load_suite(write(tmp_path, BASE), device="cpu").cells()[0]
    assert "timer" not in plain.measure and "bandwidth" not in plain.measure and plain.timer() == "events"
    assert not plain.measures_bandwidth()
    events = load_suite(
        write(
            tmp_path,
            BASE.replace("measure: {warmup: 1, min_repeats: 3}", "measure: {warmup: 1, min_repeats: 3, timer: events, matmul_rate: true}"),
        ),
        device="cpu",
    ).cells()[0]
    assert events.timer() == "events" and events.measures_bandwidth()  # unset bandwidth follows matmul_rate
    assert events.config_key() == plain.config_key()  # measure settings are not the configuration
    on_gpu = BASE.replace("cuda:\n  measure: {min_repeats: 10}", "cuda:\n  measure: {min_repeats: 10, timer: kernels}")
    assert load_suite(write(tmp_path, on_gpu), device="cuda").cells()[0].timer() == "kernels"
    with pytest.raises(SuiteError, match="measure.timer.*needs a CUDA device"):
        load_suite(write(tmp_path, BASE.replace("measure: {warmup: 1, min_repeats: 3}", "measure: {timer: graphs}")), device="cpu")


@pytest.mark.parametrize("label", ["\\e]0;owned\\a", "ours\\r", "x\\u202e", "ours\\n[####] 30/30 ok", "a\\tb", "x\\u2028y"])
def test_a_label_with_control_characters_is_refused(tmp_path, label):
    """A label is printed on every progress line: one that would steer the terminal is a suite error naming the key."""
    text = BASE.replace("  - {name: full}", f'  - {{name: full, label: "{label}"}}')
    with pytest.raises(SuiteError) as error:
        load_suite(write(tmp_path, text), device="cpu")
    assert "variants[0].label" in str(error.value) and "one line of text without control characters" in str(error.value)
