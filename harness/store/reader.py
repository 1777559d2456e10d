"""The reader of run folders: `read_run` -> `StoredRun` (how every command opens a run), `load`
(the rows of runs into one DataFrame), `latest_run`, run.json and the rows checked as they are read.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from harness.safe_io import InputFileError, check_name, read_bytes, read_json
from harness.store.files import (
    CELL_KEY_PATTERN,
    CELLS_DIR,
    JOBS_FILE,
    PARQUET,
    RUN_INFO,
    CorruptCellWarning,
    ResultsError,
)
from harness.store.schema import (
    CELL_KEY,
    CODE_VERSION,
    DEVICE_NAME,
    FINITE_COLUMNS,
    KIND,
    NUMERIC_COLUMNS,
    RUN_ID,
    STARTED_AT,
    SUITE,
    TEXT_COLUMNS,
    WALL_S,
    split,
)


def read_store_json(path: Path, kind: str = RUN_INFO) -> Any:
    """The JSON data of `path` (run.json, jobs.json: `kind` names its size limit in
    `harness.safe_io.LIMITS`), read with the bounds of `harness.safe_io`; ResultsError otherwise."""
    try:
        return read_json(path, kind, "file")  # "<path>: file not found", "<path>: file is a FIFO, ..."
    except InputFileError as error:
        raise ResultsError(str(error)) from None


def read_submissions(run_dir: Path) -> list[dict]:
    """The submissions recorded in the run's jobs.json ([] without one), each
    {"at", "cluster", "folder", "jobs": [{"job_id": str, "cells": [cell keys]}]}; ResultsError
    naming the file and the problem when it is unreadable or not of that shape."""
    file = run_dir / JOBS_FILE
    if not file.exists() and not file.is_symlink():
        return []
    data = read_store_json(file, JOBS_FILE)
    submissions = data.get("submissions") if isinstance(data, dict) else None
    if not isinstance(submissions, list):
        raise ResultsError(f"{file}: expected an object with a list 'submissions'")
    for submission in submissions:
        jobs = submission.get("jobs") if isinstance(submission, dict) else None
        if not isinstance(jobs, list) or not isinstance(submission.get("cluster", ""), str):
            raise ResultsError(f"{file}: each submission must be an object with a list 'jobs', got {_short(submission)}")
        for job in jobs:
            if not (
                isinstance(job, dict)
                and isinstance(job.get("job_id"), (str, int))
                and isinstance(job.get("cells"), list)
                and all(isinstance(key, str) for key in job["cells"])
            ):
                raise ResultsError(f"{file}: each job must be an object with a 'job_id' and a list of cell keys 'cells', got {_short(job)}")
    return submissions


def read_cells(run_dir: Path) -> tuple[list[dict], list[Path]]:
    """(rows, unreadable files) of `cells/*.json`, rows in the order they were written. A file is
    unreadable when it is not UTF-8 JSON holding an object with a `cell_key` (atomic writes never
    leave a torn file, so such a file is foreign junk or a disk fault: the caller must say so)."""
    stamped = []
    for file in (run_dir / CELLS_DIR).glob("*.json"):
        try:  # another process (a parallel worker, a Slurm job) may replace or remove files meanwhile
            stamped.append((file.stat().st_mtime_ns, file.name, file))
        except FileNotFoundError:
            continue
    files = [file for _, _, file in sorted(stamped)]
    rows, corrupt = [], []
    for file in files:
        try:
            row = read_json(file, "cell", "cell file")
        except InputFileError:
            if file.exists():
                corrupt.append(file)
            continue  # else removed meanwhile (a stale row replaced by another process)
        # the key names this file and the checkpoint: a key that is not a plain name is foreign junk
        if isinstance(row, dict) and isinstance(row.get(CELL_KEY), str) and CELL_KEY_PATTERN.fullmatch(row[CELL_KEY]):
            rows.append(row)
        else:
            corrupt.append(file)
    return rows, corrupt


def warn_corrupt(files: Iterable[Path]) -> None:
    """One CorruptCellWarning per unreadable cell file (the CLI prints them as `warning:` lines)."""
    for file in files:
        warnings.warn(
            CorruptCellWarning(f"{file}: unreadable cell file, not loaded; `harness run SUITE --resume RUN_ID` measures that cell again"),
            stacklevel=3,
        )


# --------------------------------------------------------------------------- loading


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in (RUN_INFO, CELLS_DIR, PARQUET))


def latest_run(root: str | Path, suite: str) -> Path | None:
    """The newest run folder of `suite` under `root` (run ids sort by their UTC timestamp)."""
    suite_dir = Path(root) / suite
    if not suite_dir.is_dir():
        return None
    runs = [p for p in suite_dir.iterdir() if _is_run_dir(p)]
    if not runs:
        return None
    # The id starts with a sortable timestamp; the modification time breaks ties within a second.
    return max(runs, key=lambda p: (p.name[:16], p.stat().st_mtime_ns, p.name))


# run.json fields the readers use, with the JSON types they must have (a field may be absent or null);
# those named like a column mean the same for the whole run (WALL_S: seconds the run took).
RUN_INFO_TYPES: dict[str, tuple[type, ...]] = {
    SUITE: (str,),
    "suite_path": (str,),
    "suite_text": (str,),
    KIND: (str,),
    "description": (str,),
    CODE_VERSION: (str,),
    "command": (str,),
    "executor": (str,),
    STARTED_AT: (str,),
    "finished_at": (str,),
    "interrupted_at": (str,),
    "n_cells": (int,),
    WALL_S: (int, float),
    "environment": (dict,),
    "cell_keys": (list,),
    "cell_labels": (dict,),
    "resumes": (list,),
    "overrides": (list,),
}
_JSON_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object", list: "an array"}


def check_run_info(info: Any, file: str | Path) -> dict:
    """`info` if it is run.json's object with fields of the types the readers expect
    (RUN_INFO_TYPES; `suite` a plain name, `cell_keys` plain names); ResultsError naming the field."""
    if not isinstance(info, dict):
        raise ResultsError(f"{file}: expected a JSON object, got {type(info).__name__}")
    for name, types in RUN_INFO_TYPES.items():
        value = info.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            allowed = " or ".join(_JSON_TYPE_NAMES[t] for t in types)
            raise ResultsError(f"{file}: field {name!r} must be {allowed}, got {type(value).__name__} {_short(value)}")
    try:
        if info.get(SUITE) is not None:
            check_name(info[SUITE], f"field {SUITE!r}", file)
        for key in info.get("cell_keys") or []:
            check_name(key, "an entry of 'cell_keys'", file)
    except InputFileError as error:
        raise ResultsError(str(error)) from None
    for label in (info.get("cell_labels") or {}).values():
        if not isinstance(label, str):
            raise ResultsError(f"{file}: the values of 'cell_labels' must be strings, got {type(label).__name__} {_short(label)}")
    for entry in info.get("resumes") or []:
        if not isinstance(entry, dict):
            raise ResultsError(f"{file}: the entries of 'resumes' must be objects, got {type(entry).__name__} {_short(entry)}")
    return info


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_run_info(path: str | Path) -> dict:
    """run.json of a run folder (or the run.json file itself), bounded (`harness.safe_io`) and
    checked (`check_run_info`); ResultsError naming the file and what is wrong."""
    path = Path(path)
    file = path / RUN_INFO if path.is_dir() else path
    return check_run_info(read_store_json(file), file)


def check_columns(frame: pd.DataFrame, source: str | Path) -> pd.DataFrame:
    """`frame` if its known columns hold the kinds of values the readers expect (TEXT_COLUMNS text,
    NUMERIC_COLUMNS numbers; cell keys plain names); ResultsError naming `source` and the column."""
    if frame.columns.duplicated().any() or not all(isinstance(c, str) for c in frame.columns):
        raise ResultsError(f"{source}: column names must be distinct strings")
    for column in TEXT_COLUMNS:
        if column in frame.columns:
            values = frame[column]
            bad = values[values.notna() & ~values.map(lambda v: isinstance(v, str))]
            if len(bad):
                raise ResultsError(f"{source}: column {column!r} must hold text, found {type(bad.iloc[0]).__name__} {_short(bad.iloc[0])}")
    for column in NUMERIC_COLUMNS:
        if column in frame.columns and frame[column].notna().any():
            values = frame[column]
            if values.dtype == object:
                numeric = values.map(lambda v: v is None or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool)))
                if not numeric.all():
                    bad = values[~numeric].iloc[0]
                    raise ResultsError(f"{source}: column {column!r} must hold numbers, found {type(bad).__name__} {_short(bad)}")
                frame[column] = pd.to_numeric(values)
            elif not (pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)):
                raise ResultsError(f"{source}: column {column!r} must hold numbers, found {values.dtype}")
            if column in FINITE_COLUMNS and np.isinf(frame[column].astype("float64")).any():
                raise ResultsError(f"{source}: column {column!r} holds an infinite value")
    if CELL_KEY in frame.columns:
        bad = frame[CELL_KEY].dropna().map(lambda key: not CELL_KEY_PATTERN.fullmatch(key))
        if bad.any():
            raise ResultsError(f"{source}: {CELL_KEY} {_short(frame[CELL_KEY].dropna()[bad].iloc[0])} is not a plain name")
    return frame


def _lists_back(frame: pd.DataFrame) -> pd.DataFrame:
    """pyarrow reads list columns as numpy arrays; turn them back into Python lists."""
    for column in frame.columns:
        if frame[column].dtype == object and frame[column].map(lambda v: isinstance(v, np.ndarray)).any():
            frame[column] = frame[column].map(lambda v: v.tolist() if isinstance(v, np.ndarray) else v)
    return frame


def _read_parquet(file: Path) -> pd.DataFrame:
    try:
        data = read_bytes(file, "parquet", "results file")  # a regular file of bounded size, never a FIFO
    except InputFileError as error:
        raise ResultsError(str(error)) from None
    try:
        return check_columns(_lists_back(pd.read_parquet(io.BytesIO(data))), file)
    except ResultsError:
        raise
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for corrupt files
        raise ResultsError(f"{file}: unreadable parquet ({type(error).__name__}: {error})") from None


def read_rows(run_dir: Path, strict: bool = True, warn: bool = True) -> pd.DataFrame | None:
    """The rows of a run folder: results.parquet with the journal's rows (cells/*.json) over it (a
    journal row replaces the parquet's row of its key), in the order they were first written; None
    when there are none. Unreadable journal files are warned about (unless the parquet still holds
    their key) with `warn`. An unreadable parquet: ResultsError with `strict`, else the journal."""
    parquet = run_dir / PARQUET
    journal, corrupt = read_cells(run_dir)
    stored, problem = None, None
    if parquet.exists():
        try:
            stored = _read_parquet(parquet)
        except ResultsError as error:
            problem = str(error)
    if problem is not None and (strict or not journal):
        raise ResultsError(
            f"{problem}; move it away to run this run's cells again"
            + (f" ({len(journal)} rows are in the journal {run_dir / CELLS_DIR})" if journal else "")
        )
    if problem is not None and warn:
        warnings.warn(CorruptCellWarning(f"{problem}; only the journal's rows are loaded"), stacklevel=2)
    frame = stored
    if journal:
        newer = check_columns(_lists_back(pd.DataFrame(journal)), run_dir / CELLS_DIR)
        if stored is not None and CELL_KEY in stored.columns:
            kept = stored[~stored[CELL_KEY].astype(str).isin(set(newer[CELL_KEY]))]
            frame = pd.concat([kept, newer], ignore_index=True) if len(kept) else newer
        else:
            frame = newer
    loaded = set(frame[CELL_KEY].astype(str)) if frame is not None and CELL_KEY in frame.columns else set()
    if warn:
        warn_corrupt(file for file in corrupt if file.stem not in loaded)  # a row the parquet still holds is not lost
    if frame is None or frame.empty:
        return None
    return frame.reset_index(drop=True)


def _load_run_dir(run_dir: Path) -> pd.DataFrame:
    frame = read_rows(run_dir, strict=False)
    if frame is not None:
        return frame
    corrupt = read_cells(run_dir)[1]
    if corrupt:
        raise ResultsError(
            f"{run_dir}: every cell file is unreadable ({', '.join(f.name for f in corrupt[:5])}{', ...' if len(corrupt) > 5 else ''})"
        )
    raise ResultsError(f"{run_dir}: no results yet (neither {PARQUET} nor {CELLS_DIR}/*.json)")


def resolve_run(arg: str | Path, root: Path) -> tuple[Path, str, str, str]:
    """(path, kind, suite, run_id) for a run folder, suite folder, run id or parquet file."""
    path = Path(arg)
    if path.is_file():
        if path.suffix != ".parquet":
            raise ResultsError(f"{path}: not a .parquet file")
        return path, "parquet", path.parent.parent.name, path.parent.name
    candidates = [path] if path.is_absolute() else [path, root / path]
    for candidate in candidates:
        if _is_run_dir(candidate):
            return candidate, "run", candidate.parent.name, candidate.name
        if candidate.is_dir():
            run = latest_run(candidate.parent, candidate.name)
            if run is None:
                raise ResultsError(f"{candidate}: no run folders in this suite folder")
            return run, "run", candidate.name, run.name
    if root.is_dir() and len(path.parts) == 1:
        matches = [d for d in root.glob(f"*/{path.name}") if _is_run_dir(d)]
        if len(matches) > 1:
            listed = ", ".join(str(m) for m in matches)
            raise ResultsError(f"run id {str(arg)!r} is ambiguous under {root}: {listed}")
        if matches:
            return matches[0], "run", matches[0].parent.name, matches[0].name
    suites = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    known = f"suites under {root}: {', '.join(suites)}" if suites else f"{root} holds no suites"
    raise ResultsError(f"{str(arg)!r} is not a run folder, suite folder, run id or results.parquet ({known})")


def load(*paths_or_run_ids: str | Path, root: str | Path = "results") -> pd.DataFrame:
    """All rows of the given runs as one DataFrame, with RUN_ID and SUITE columns.

    Each argument is a run folder, a suite folder (its latest run), a run id (searched under
    `root`) or a results.parquet file. With no arguments: the latest run of every suite under
    `root`. A missing or corrupt results.parquet falls back to the run's cells/*.json.
    """
    root = Path(root)
    if not paths_or_run_ids:
        if not root.is_dir():
            raise ResultsError(f"{root}: results folder not found")
        paths_or_run_ids = tuple(sorted(str(d) for d in root.iterdir() if d.is_dir() and latest_run(root, d.name)))
        if not paths_or_run_ids:
            raise ResultsError(f"{root}: no runs found")
    frames = []
    for arg in paths_or_run_ids:
        path, kind, suite, run_id = resolve_run(arg, root)
        frame = _read_parquet(path) if kind == "parquet" else _load_run_dir(path)
        for column, value in ((RUN_ID, run_id), (SUITE, suite)):
            if column not in frame.columns:
                frame[column] = value
            else:
                frame[column] = frame[column].where(frame[column].notna(), value)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def cell_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """`split(frame).without_rounds` (harness.store.schema): every row but those of single rounds."""
    return split(frame).without_rounds


# --------------------------------------------------------------------------- one stored run


@dataclass
class StoredRun:
    """A stored run as every reader sees it (report, compare, check, status).

    path: the run folder; source: what was named (the run folder, or a results.parquet in it);
    info: run.json ({} when there is none); rows: its rows (empty unless loaded); corrupt: cell
    files that could not be read and whose rows are therefore missing from `rows`.
    """

    path: Path
    source: Path
    info: dict
    rows: pd.DataFrame
    corrupt: list[Path] = field(default_factory=list)

    @property
    def suite(self) -> str:
        """run.json's suite (checked to be a plain name by `load_run_info`), else the parent folder's name."""
        return str(self.info.get(SUITE) or self.path.parent.name)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        """`<suite>/<run_id>` for a run folder, else the parquet file's path."""
        return f"{self.path.parent.name}/{self.path.name}" if self.source.is_dir() else str(self.source)

    @property
    def device_name(self) -> str:
        """run.json's device name, else the rows' `device_name` values, else "unknown"."""
        name = (self.info.get("environment") or {}).get(DEVICE_NAME)
        if name:
            return str(name)
        names = sorted({str(v) for v in self.rows.get(DEVICE_NAME, pd.Series(dtype=object)).dropna()})
        return ", ".join(names) or "unknown"

    @property
    def code_version(self) -> str:
        """The rows' code versions (comma-separated), else run.json's."""
        versions = sorted({str(v) for v in self.rows.get(CODE_VERSION, pd.Series(dtype=object)).dropna()})
        return ", ".join(versions) or str(self.info.get(CODE_VERSION, "unknown"))


def read_run(arg: str | Path, root: str | Path = "results", load_rows: bool = True) -> StoredRun:
    """Open a run by run folder, suite folder (its latest run), run id (under `root`) or
    results.parquet: its run.json, and (with `load_rows`) its rows as `load` gives them, with the
    unreadable cell files named in `corrupt`. ResultsError for anything missing or unreadable."""
    source, kind, _, _ = resolve_run(arg, Path(root))
    folder = source.parent if kind == "parquet" else source
    info = load_run_info(folder) if os.path.lexists(folder / RUN_INFO) else {}  # a FIFO or a bad link: named by the bounded reader
    if not load_rows:
        return StoredRun(folder, source, info, pd.DataFrame())
    rows = load(source, root=root)
    loaded = set(rows[CELL_KEY].astype(str)) if CELL_KEY in rows else set()
    return StoredRun(folder, source, info, rows, [f for f in read_cells(folder)[1] if f.stem not in loaded])
