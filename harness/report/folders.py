"""Where reports read from and write to: opening runs, output folders, staged writes, shown paths."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from harness.safe_io import InputFileError, check_name, check_under
from harness.store.files import ResultsError
from harness.store.reader import StoredRun, latest_run, load_run_info, read_run
from harness.store.schema import SEQ_LEN, STATUS, VARIANT, VARIANT_LABEL

RESULTS_ROOT = Path("results")  # relative to the working directory, never to where the package lives
REQUIRED_COLUMNS = (STATUS, VARIANT, VARIANT_LABEL, SEQ_LEN)


def reports_root(results_root: str | Path) -> Path:
    """Where reports go by default: `reports/` beside the results root (results/ -> reports/)."""
    return Path(results_root).parent / "reports"


def shown_path(path: str | Path) -> str:
    """`path` as a report or summary names it: relative to the working directory when it lies inside
    it, however it was given (absolute or relative), so that a report committed with its results
    names no machine; a path outside the working directory is shown absolute (a `../../` chain would
    only hide where it is)."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path.cwd().absolute()).as_posix()
    except ValueError:
        return absolute.as_posix()


def open_run(arg: str | Path, root: str | Path = RESULTS_ROOT) -> StoredRun:
    """`results.read_run`, checked to have a run.json and to be a harness results table (REQUIRED_COLUMNS)."""
    run = read_run(arg, root)
    if not run.info:
        load_run_info(run.path)  # raises the clear "run.json: file not found"
    missing = [c for c in REQUIRED_COLUMNS if c not in run.rows.columns]
    if missing:
        raise ResultsError(f"{run.path}: results lack the column(s) {', '.join(missing)}; not a harness results table?")
    labels = run.rows[VARIANT_LABEL]
    if labels.isna().any():  # a row without a label (a foreign or damaged file): named by its variant
        run.rows[VARIANT_LABEL] = labels.where(labels.notna(), run.rows[VARIANT].where(run.rows[VARIANT].notna(), "?").astype(str))
    return run


def default_runs(root: str | Path = RESULTS_ROOT) -> list[Path]:
    """The latest run of every suite under `root`."""
    root = Path(root)
    suites = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(("_", "."))] if root.is_dir() else []
    runs = [latest_run(root, d.name) for d in suites]  # baselines/<device>/<name>/ holds no run folders itself
    runs = [r for r in runs if r is not None]
    if not runs:
        raise ResultsError(f"{root}: no runs found (run a suite first: python -m harness run suites/seq_length.yaml)")
    return runs


def output_folder(base: Path, *parts: tuple[str, str, Path]) -> Path:
    """`base/<name>/...` for (name, what, file it came from) parts read from stored runs: each a
    plain name (`harness.safe_io.check_name`) and the result under `base`; ResultsError otherwise."""
    try:
        folder = base.joinpath(*(check_name(name, what, where) for name, what, where in parts))
        return check_under(folder, base)
    except InputFileError as error:
        raise ResultsError(f"{error}; not used as a folder name") from None


@contextmanager
def staged(folder: Path) -> Iterator[Path]:
    """A new temporary folder beside `folder` to write a report into; when the block ends without an
    error its files are moved into `folder` (created if need be), else it is removed: a report that
    fails half-way leaves no figures without their report.md."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield staging
        folder.mkdir(exist_ok=True)
        for file in sorted(staging.iterdir(), key=lambda f: f.name in ("report.md", "index.html")):  # documents last
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def writing(folder: Path) -> Iterator[None]:
    """Turn an OSError while writing into `folder` (full disk, read-only place, a file in the way)
    into a ResultsError naming the folder (exit 2)."""
    try:
        yield
    except OSError as error:
        raise ResultsError(f"cannot write to {folder}: {error.strerror or error}; choose another --out") from None
