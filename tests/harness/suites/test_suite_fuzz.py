"""Fuzzing the suite loader through `harness run --dry-run`: random YAML documents and random
mutations of every shipped suite (benchmark and quality) must each give a valid suite (exit 0) or
a clean exit-2 error: never a traceback, never a hang.

The number of examples is bounded for CI (`FUZZ_EXAMPLES`, default 120 per test, derandomized so a
CI failure reproduces; `FUZZ_RANDOM=1` draws new ones); docs/decisions.md records the larger
campaigns run by hand.
"""

from __future__ import annotations

import contextlib
import io
import os
import string
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.cli import main

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = sorted((ROOT / "suites").glob("*.yaml"))
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
RANDOM = os.environ.get("FUZZ_RANDOM") == "1"  # a fresh campaign instead of CI's fixed one
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Keys and values a suite uses, so random documents get past the first check often enough.
KEYS = [
    "name",
    "kind",
    "description",
    "device",
    "dtype",
    "mode",
    "workload",
    "model",
    "sweep",
    "variants",
    "measure",
    "cpu",
    "cuda",
    "checks",
    "slurm",
    "seq_len",
    "batch",
    "tokens_per_batch",
    "d_model",
    "n_heads",
    "causal",
    "n_layers",
    "n_hashes",
    "bucket_size",
    "warmup",
    "min_repeats",
    "timeout_s",
    "memory_limit_gib",
    "ratios",
    "targets",
    "numerator",
    "denominator",
    "at",
    "max",
    "task",
    "train",
    "eval",
    "eval_variants",
    "label",
    "steps",
    "partition",
    "threads",
    "residual",
    "d_ff",
    "vocab_size",
]
WORDS = [
    "full",
    "sdpa",
    "lsh",
    "cpu",
    "cuda",
    "auto",
    "float32",
    "bfloat16",
    "forward",
    "forward_backward",
    "train_step",
    "attention",
    "block",
    "model",
    "quality",
    "benchmark",
    "duplication",
    "reversible",
    "variant == 'lsh'",
    "seq_len <= 1024",
    "@x.y == 1",
    "__import__('os')",
    "*alias",
    "&anchor",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.sampled_from(WORDS),
    st.text(string.printable, max_size=12),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner, max_size=6)
    ),
    max_leaves=40,
)


def dry_run(path: Path) -> int:
    """`harness run PATH --dry-run --device cpu`: its exit status; any exception fails the test."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["run", str(path), "--dry-run", "--device", "cpu", "--out", str(path.parent / "out")])
    assert code in (0, 2), (code, err.getvalue())
    assert "Traceback" not in err.getvalue()
    return code


@FUZZ
@given(document=st.dictionaries(st.sampled_from(KEYS), documents, max_size=8))
def test_random_documents_are_a_suite_or_a_clean_error(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("doc") / "suite.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    dry_run(path)


def _mutate(text: str, data: st.DataObject) -> str:
    """One to three edits of the suite text: drop, repeat or swap lines, change a token, insert junk."""
    lines = text.splitlines()
    for _ in range(data.draw(st.integers(1, 3))):
        if not lines:
            break
        i = data.draw(st.integers(0, len(lines) - 1))
        edit = data.draw(st.sampled_from(["drop", "repeat", "swap", "token", "insert", "truncate"]))
        if edit == "drop":
            del lines[i]
        elif edit == "repeat":
            lines.insert(i, lines[i])
        elif edit == "swap":
            j = data.draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif edit == "token":
            tokens = lines[i].split(" ")
            k = data.draw(st.integers(0, len(tokens) - 1))
            tokens[k] = data.draw(
                st.one_of(
                    st.sampled_from(WORDS + KEYS),
                    st.integers(-5, 10**6).map(str),
                    st.sampled_from(["[]", "{}", "[1, 2]", "null", "-1", "0", "1e9", "'", ":", "]"]),
                )
            )
            lines[i] = " ".join(tokens)
        elif edit == "insert":
            lines.insert(i, data.draw(st.text(string.printable, max_size=20)))
        else:
            lines[i] = lines[i][: data.draw(st.integers(0, len(lines[i])))]
    return "\n".join(lines) + "\n"


@FUZZ
@given(source=st.sampled_from(SHIPPED), data=st.data())
def test_mutated_shipped_suites_are_a_suite_or_a_clean_error(tmp_path_factory, source, data):
    path = tmp_path_factory.mktemp("mutant") / source.name
    path.write_text(_mutate(source.read_text(), data))
    dry_run(path)


def test_every_shipped_suite_is_valid(tmp_path):
    for source in SHIPPED:
        path = tmp_path / source.name
        path.write_text(source.read_text())
        assert dry_run(path) == 0, source
