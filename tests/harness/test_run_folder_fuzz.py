"""Fuzzing run folders: random mutations of a small finished run (run.json fields and types,
results.parquet columns and dtypes, journal and jobs files, special files in place of any of them)
must give each of report, status, check and compare its result or a clean exit-2 error: never a
traceback, never a hang, never a file written outside the output folder.

The number of examples is bounded for CI (`RUN_FUZZ_EXAMPLES`, default 25, derandomized so a CI
failure reproduces; `FUZZ_RANDOM=1` draws new ones); docs/decisions.md records the larger campaign
run by hand.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import cli
from harness.store.files import CELLS_DIR, JOBS_FILE, PARQUET, RUN_INFO
from harness.store.reader import RUN_INFO_TYPES
from harness.store.writer import RunStore
from harness.suites import load_suite
from tests.harness.test_check import SUITE, make_run

EXAMPLES = int(os.environ.get("RUN_FUZZ_EXAMPLES", "25"))
RANDOM = os.environ.get("FUZZ_RANDOM") == "1"
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

# JSON values of every type, small, some of them path-like or markup-like strings
TEXTS = st.sampled_from(["", "ok", "error", "../../x", "/tmp/x", "<script>alert(1)</script>", "[a](javascript:x)", "a" * 300])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), TEXTS, st.text(max_size=20))
VALUES = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8
)
FIELDS = st.sampled_from([*RUN_INFO_TYPES, "suite_text", "environment", "other"])
COLUMNS = st.sampled_from(
    [
        "status",
        "cell_key",
        "variant",
        "variant_label",
        "seq_len",
        "batch",
        "time_ms_median",
        "time_ms_samples",
        "peak_mem_mib",
        "row_type",
        "variant_params",
        "device_name",
        "code_version",
        "n_repeats",
    ]
)
COLUMN_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True), TEXTS, st.lists(st.integers(0, 9), max_size=3)
)
TARGETS = st.sampled_from([RUN_INFO, PARQUET, JOBS_FILE, f"{CELLS_DIR}/extra.json"])


def special(run: Path, name: str, kind: str) -> None:
    """Put a special file of `kind` at `run/name` ("none": just remove what is there)."""
    path = run / name
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if path.parent.is_symlink() or (path.parent.exists() and not path.parent.is_dir()):
        special(run, str(path.parent.relative_to(run)), "none")
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "dangling link":
        path.symlink_to(run / "nowhere")
    elif kind == "directory":
        path.mkdir()
    elif kind == "deep JSON":
        path.write_text("[" * 100_000 + "]" * 100_000)


MUTATIONS = st.one_of(
    st.tuples(st.just("set field"), FIELDS, VALUES),
    st.tuples(st.just("drop field"), FIELDS, st.none()),
    st.tuples(st.just("run.json value"), st.none(), VALUES),
    st.tuples(st.just("set column"), COLUMNS, COLUMN_VALUES),
    st.tuples(st.just("drop column"), COLUMNS, st.none()),
    st.tuples(st.just("column as text"), COLUMNS, st.none()),
    st.tuples(
        st.just("journal row"),
        st.none(),
        st.dictionaries(st.sampled_from(["cell_key", "status", "seq_len", "variant", "variant_label"]), VALUES, max_size=5),
    ),
    st.tuples(st.just("jobs.json"), st.none(), VALUES),
    st.tuples(st.just("bytes"), TARGETS, st.binary(max_size=64)),
    st.tuples(st.just("special"), TARGETS, st.sampled_from(["fifo", "dev/zero", "dangling link", "directory", "deep JSON"])),
)


def mutate(run: Path, mutation: tuple) -> None:
    kind, what, value = mutation
    if kind in ("set field", "drop field", "run.json value"):
        try:
            info = json.loads((run / RUN_INFO).read_text())
        except (OSError, ValueError):
            info = None  # an earlier mutation spoiled it: a field mutation leaves it so
        if kind != "run.json value" and not isinstance(info, dict):
            return
        if kind == "set field":
            info[what] = value
        elif kind == "drop field":
            info.pop(what, None)
        else:
            info = value
        (run / RUN_INFO).write_text(json.dumps(info))
    elif kind in ("set column", "drop column", "column as text"):
        try:
            frame = pd.read_parquet(run / PARQUET)
        except Exception:  # noqa: BLE001 - spoiled by an earlier mutation: left so
            return
        if kind == "drop column":
            frame = frame.drop(columns=[what], errors="ignore")
        elif kind == "column as text" and what in frame:
            frame[what] = frame[what].astype(str)
        elif kind == "set column":
            frame[what] = [value] * len(frame)
        try:
            frame.to_parquet(run / PARQUET)
        except Exception:  # noqa: BLE001 - pyarrow cannot store some mixes; the file is spoiled another way
            (run / PARQUET).write_bytes(b"PAR1 not parquet")
    elif kind == "journal row":
        special(run, f"{CELLS_DIR}/fuzz.json", "none")
        (run / CELLS_DIR / "fuzz.json").write_text(json.dumps(value))
    elif kind == "jobs.json":
        special(run, JOBS_FILE, "none")
        (run / JOBS_FILE).write_text(json.dumps(value))
    elif kind == "bytes":
        special(run, what, "none")
        (run / what).write_bytes(value)
    else:
        special(run, what, value)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    (root / "synthetic.yaml").write_text(SUITE)
    cells = [c for c in load_suite(root / "synthetic.yaml").cells() if c.seq_len == 512][:2]  # 2 cells: quick reports
    path = make_run(root, "r1", cells)
    RunStore(root, "synthetic", "r1").fold()
    return path


def run_command(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exit:  # argparse
            code = exit.code
    return code, err.getvalue()


@FUZZ
@given(mutations=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_every_command_gives_its_result_or_a_clean_exit_2(finished, mutations):
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        run = base / "results" / "synthetic" / "fuzzed"
        shutil.copytree(finished, run)
        for mutation in mutations:
            mutate(run, mutation)
        before = set(base.rglob("*"))
        for name, argv in {
            "report": ["report", str(run), "--out", str(base / "out" / "report")],
            "status": ["status", str(run)],
            "check": ["check", str(run), "--baseline", str(finished)],
            "compare": ["compare", str(finished), str(run), "--out", str(base / "out" / "compare")],
        }.items():
            begin = time.monotonic()
            with np.errstate(all="ignore"):
                code, err = run_command(argv)
            assert time.monotonic() - begin < 60, (name, mutations)
            assert "Traceback" not in err and code in (0, 1, 2), (name, mutations, code, err)
            if code == 2:
                lines = err.splitlines()
                assert lines[-1].startswith("error: ") and all(line.startswith(("error: ", "warning: ")) for line in lines), (
                    name,
                    mutations,
                    err,
                )
                assert not (base / "out" / name).exists(), (name, mutations)  # nothing half-written
        written = {p for p in set(base.rglob("*")) - before if base / "out" not in p.parents and p != base / "out"}
        assert not written, (mutations, written)  # nothing outside the output folders (status writes nothing new)
