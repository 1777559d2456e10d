"""Result storage: one folder per run, atomic per-cell writes, loading into pandas.

Layout::

    <root>/<suite>/<run_id>/run.json            environment + suite + command
    <root>/<suite>/<run_id>/results.parquet     the rows (rewritten after every row)
    <root>/<suite>/<run_id>/cells/<key>.json    the journal: rows written since the run last finished
    <root>/<suite>/<run_id>/.lock               held (flock) by the one process running the run

While a run goes on, every row is first written to its own journal file `cells/<key>.json`, then
results.parquet is rewritten from the parquet's rows and the journal's (a journal row replaces a
parquet row of its key). When the run finishes, `fold` empties the journal into the parquet, so a
finished run stores each row once; a run killed at any moment keeps its journal, and a resume goes
on from parquet + journal. Every file is written to a temporary file in the same folder and renamed
over the target, so readers never see a torn file. A journal file that cannot be read (foreign
junk, a disk error) is never dropped silently: `load` warns (`CorruptCellWarning`),
`corrupt_cells` lists it, and a resume measures that cell again.
Run ids are checked by `check_run_id` wherever one is taken from a user; new ids are reserved
atomically (`new_run_id` creates the folder); a run being run or resumed is locked (`RunStore.lock`).
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import re
import socket
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

from harness.cells import ROUND_ROW
from harness.safe_io import InputFileError, check_name, read_bytes, read_json

RUN_INFO = "run.json"
CELLS_DIR = "cells"
RUNNING_DIR = "running"  # running/<key>.json: a cell being measured now (host, pid, job), gone once stored
PARQUET = "results.parquet"
LOCK_FILE = ".lock"
JOBS_FILE = "jobs.json"  # submitted job ids, per submission (harness.executors), for `harness status`
ROWS_LOCK = ".rows.lock"  # held while results.parquet is read, merged with the journal and rewritten
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
CELL_KEY_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")  # a cell key names files: cells/<key>.json


class ResultsError(Exception):
    """A results folder or file that is missing or unreadable; str is a human message."""


class RunLockedError(ResultsError):
    """Another process holds the run folder's lock (it is running or resuming that run)."""


class CorruptCellWarning(UserWarning):
    """A `cells/<key>.json` that cannot be read as a row; the message names the file."""


def file_mode(folder: bool = False) -> int:
    """The permissions `open()` / `mkdir()` would give under the current umask (0644 / 0755 usually),
    for files made through mkstemp / mkdtemp, which would be private (0600 / 0700)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


# --------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not supported everywhere, and not worth failing over.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write `text` (UTF-8) to `path`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (Path, datetime)):
        return str(value)
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__} {value!r}")


def to_json(data: Any, indent: int | None = 2) -> str:
    """JSON text of `data`; numpy scalars/arrays, tuples, sets and paths are converted."""
    return json.dumps(data, indent=indent, default=_json_default, sort_keys=False)


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Atomically write `data` as indented JSON to `path`."""
    atomic_write_text(path, to_json(data) + "\n")


# --------------------------------------------------------------------------- run ids and store


def new_run_id(device_slug: str, parent: str | Path | None = None) -> str:
    """`YYYYmmddTHHMMSSZ-<device_slug>` in UTC. With `parent` (the suite folder) the id is reserved:
    its folder is created atomically (mkdir, no check-then-create race), and a `-2`, `-3`, ...
    suffix is added while a folder of that name already exists, so concurrent starts get distinct ids."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", device_slug).strip("-.") or "device"
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{slug}"
    if parent is None:
        return run_id
    Path(parent).mkdir(parents=True, exist_ok=True)
    candidate, n = run_id, 1
    while True:
        try:
            (Path(parent) / candidate).mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{run_id}-{n}"


def check_run_id(run_id: str, option: str = "run id") -> str:
    """`run_id` if it is a plain folder name (letters, digits, '_', '.', '-'; no '/', no '..');
    ResultsError naming `option` otherwise. Every command that takes a run id to write into uses it."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise ResultsError(
            f"{option} {run_id!r}: a run id is a folder name of letters, digits, '_', '.' and '-' "
            "(e.g. 20261123T121443Z-amd-epyc), not a path"
        )
    return run_id


def resume_store(root: str | Path, suite: str, run_id: str, option: str = "--resume") -> RunStore:
    """The existing run `run_id` of `suite` under `root`, to continue it: the id must be a plain
    folder name, the folder must hold a run.json, and that run must belong to `suite`."""
    check_run_id(run_id, option)
    folder = Path(root) / suite / run_id
    if not (folder / RUN_INFO).is_file():
        raise ResultsError(f"{option} {run_id}: no run of suite {suite!r} at {folder} (expected {folder / RUN_INFO})")
    owner = load_run_info(folder).get("suite")
    if owner is not None and owner != suite:
        raise ResultsError(f"{option} {run_id}: {folder} is a run of suite {owner!r}, not {suite!r}")
    return RunStore(root, suite, run_id)


def _read_json(path: Path, kind: str = RUN_INFO) -> Any:
    """The JSON data of `path`, read with the bounds of `harness.safe_io`; ResultsError otherwise."""
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
    data = _read_json(file, JOBS_FILE)
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
        if isinstance(row, dict) and isinstance(row.get("cell_key"), str) and CELL_KEY_PATTERN.fullmatch(row["cell_key"]):
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


def rows_to_parquet_bytes(rows: list[dict] | pd.DataFrame) -> bytes:
    """Parquet bytes of `rows` (dicts or a DataFrame); object columns pyarrow cannot type (mixed
    kinds) become JSON text."""
    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    buffer = io.BytesIO()
    try:
        frame.to_parquet(buffer, index=False)
    except Exception:  # pyarrow raises several types (ArrowTypeError, ArrowInvalid, ...)
        import pyarrow as pa

        for column in frame.columns:
            if frame[column].dtype != object:
                continue
            try:
                pa.array(frame[column].tolist(), from_pandas=True)
            except Exception:
                frame[column] = [None if _is_missing(v) else to_json(v, indent=None) for v in frame[column]]
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@contextmanager
def _flocked(path: Path, blocking: bool) -> Iterator[Any]:
    """An open handle on `path` holding an exclusive flock; BlockingIOError when not `blocking` and taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    with os.fdopen(fd, "r+", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield handle
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class RunStore:
    """The folder of one run: `RunStore(root, suite, run_id).path == root/suite/run_id`."""

    def __init__(self, root: str | Path, suite: str, run_id: str, create: bool = True):
        """`create`: make the folder and its cells/ (False for readers such as `harness status`, which
        must work on a read-only copy and leave a run folder someone sent as it is)."""
        self.root = Path(root)
        self.suite = suite
        self.run_id = run_id
        self.path = self.root / suite / run_id
        if create:
            (self.path / CELLS_DIR).mkdir(parents=True, exist_ok=True)

    def write_run_info(self, info: dict) -> None:
        """Write run.json (environment, suite, command, ...)."""
        atomic_write_json(self.path / RUN_INFO, info)

    def update_run_info(self, **fields: Any) -> None:
        """Merge `fields` into run.json (e.g. `finished_at=...`): read, merge and replace under an
        exclusive lock of run.json's own, so concurrent updaters (threads, processes) lose nothing."""
        file = self.path / RUN_INFO
        with _flocked(self.path / f".{RUN_INFO}.lock", blocking=True):
            info = _read_json(file) if file.exists() else {}
            info.update(fields)
            self.write_run_info(info)

    @contextmanager
    def lock(self, purpose: str = "run") -> Iterator[RunStore]:
        """Hold this run's exclusive lock (an flock on `.lock`, released when the process ends, so
        it is never stale) while running or resuming it. RunLockedError, naming the holder's host,
        pid and start, when another process holds it; nothing is touched then."""
        try:
            with _flocked(self.path / LOCK_FILE, blocking=False) as handle:
                handle.seek(0)
                handle.truncate()
                handle.write(
                    to_json(
                        {
                            "host": socket.gethostname(),
                            "pid": os.getpid(),
                            "purpose": purpose,
                            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        },
                        indent=None,
                    )
                )
                handle.flush()
                yield self
        except BlockingIOError:
            try:
                holder = read_json(self.path / LOCK_FILE, "note", "lock file")
                who = f"pid {holder['pid']} on {holder['host']} ({holder['purpose']} since {holder['since']})"
            except (InputFileError, KeyError, TypeError):
                who = "another process"
            raise RunLockedError(
                f"run {self.path} is in use by {who}; wait for it to finish or stop it, "
                "then run again (two processes must not measure one run at once)"
            ) from None

    def corrupt_cells(self) -> list[Path]:
        """The cell files that cannot be read as rows (see `read_cells`)."""
        return read_cells(self.path)[1]

    def append(self, row: dict) -> None:
        """Store one row (by `row["cell_key"]`, replacing an earlier row of that key): its journal
        file first, then results.parquet rewritten with it."""
        key = row.get("cell_key")
        if not isinstance(key, str) or not CELL_KEY_PATTERN.fullmatch(key):
            raise ValueError(f"row needs a file-name-safe 'cell_key', got {key!r}")
        row = {"run_id": self.run_id, "suite": self.suite, **row}
        atomic_write_json(self.path / CELLS_DIR / f"{key}.json", row)
        try:
            (self.path / RUNNING_DIR / f"{key}.json").unlink()
        except FileNotFoundError:
            pass
        self.rebuild()

    def rebuild(self) -> None:
        """Rewrite results.parquet from its rows and the journal's, under the rows lock (so writers in
        other processes, a pool's training cells say, never lose each other's rows)."""
        with _flocked(self.path / ROWS_LOCK, blocking=True):
            self._write_parquet(read_rows(self.path, warn=False))

    def _write_parquet(self, frame: pd.DataFrame | None) -> None:
        atomic_write_bytes(self.path / PARQUET, rows_to_parquet_bytes(frame if frame is not None else []))

    def fold(self) -> None:
        """A finished run: rewrite results.parquet with every row, then empty the journal (the
        readable files; an unreadable one stays, named by `corrupt_cells`, for a resume to redo)."""
        with _flocked(self.path / ROWS_LOCK, blocking=True):
            journal, _ = read_cells(self.path)
            self._write_parquet(read_rows(self.path, warn=False))
            self._drop_journal(row["cell_key"] for row in journal)

    def _drop_journal(self, keys: Iterable[str]) -> None:
        """Delete the journal files of `keys` (those that exist), durably."""
        for key in keys:
            try:
                (self.path / CELLS_DIR / f"{key}.json").unlink()
            except FileNotFoundError:
                pass
        _fsync_dir(self.path / CELLS_DIR)

    def mark_running(self, key: str, **info: Any) -> None:
        """Note that cell `key` is being measured now, by this host and process (`harness status`)."""
        import socket

        info = {
            "cell_key": key,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **info,
        }
        atomic_write_json(self.path / RUNNING_DIR / f"{key}.json", info)

    def clear_running(self, key: str) -> None:
        """Remove the `mark_running` note of cell `key` (a round of it is stored, the cell not yet)."""
        try:
            (self.path / RUNNING_DIR / f"{key}.json").unlink()
        except FileNotFoundError:
            pass

    def running(self) -> dict[str, dict]:
        """cell_key -> the `mark_running` note of cells started but not stored (possibly stale)."""
        notes = {}
        for file in (self.path / RUNNING_DIR).glob("*.json"):
            try:
                note = read_json(file, "note", "running note")
            except InputFileError:
                continue
            if isinstance(note, dict):
                notes[file.stem] = note
        return notes

    def remove(self, keys: Iterable[str]) -> None:
        """Delete the rows of `keys` (e.g. a cell's row from an older code version) from the parquet
        and the journal. Keys not stored are ignored."""
        keys = set(keys)
        for key in keys:
            if not isinstance(key, str) or not CELL_KEY_PATTERN.fullmatch(key):
                raise ValueError(f"not a cell_key: {key!r}")
        with _flocked(self.path / ROWS_LOCK, blocking=True):
            frame = read_rows(self.path, warn=False)
            if frame is None or "cell_key" not in frame or not frame["cell_key"].isin(keys).any():
                return
            self._write_parquet(frame[~frame["cell_key"].isin(keys)])
            self._drop_journal(keys)

    def rows(self) -> list[dict]:
        """All stored rows (parquet, then the journal's newer ones), each a dict of its non-missing
        columns; unreadable journal files: `corrupt_cells`. An unreadable results.parquet is a
        ResultsError: a run is never continued over rows it cannot read."""
        frame = read_rows(self.path, warn=False)
        if frame is None:
            return []
        return [{k: v for k, v in record.items() if not _is_missing(v)} for record in frame.to_dict("records")]

    def finished_keys(self) -> set[str]:
        """cell_keys of stored rows whose status is not "error" (what a resume skips)."""
        return {r["cell_key"] for r in self.rows() if r.get("status") != "error" and "cell_key" in r}


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


# run.json fields the readers use, with the JSON types they must have (a field may be absent or null)
RUN_INFO_TYPES: dict[str, tuple[type, ...]] = {
    "suite": (str,),
    "suite_path": (str,),
    "suite_text": (str,),
    "kind": (str,),
    "description": (str,),
    "code_version": (str,),
    "command": (str,),
    "executor": (str,),
    "started_at": (str,),
    "finished_at": (str,),
    "interrupted_at": (str,),
    "n_cells": (int,),
    "wall_s": (int, float),
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
        if info.get("suite") is not None:
            check_name(info["suite"], "field 'suite'", file)
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
    return check_run_info(_read_json(file), file)


# Columns the readers use, by the kind of value they must hold (missing values are always allowed).
TEXT_COLUMNS = (
    "cell_key", "status", "variant", "variant_label", "row_type", "suite", "run_id", "error", "message",
    "workload", "mode", "device", "dtype", "code_version", "device_name", "config_key", "task", "eval_variant",
    "train_variant", "contention", "timer", "mem_method", "residual",
)  # fmt: skip
NUMERIC_COLUMNS = (
    "seq_len", "batch", "tokens_per_batch", "time_ms_median", "peak_mem_mib", "activation_mem_mib", "n_repeats",
    "step", "accuracy", "bpd", "rounds", "round_drift", "n_layers", "ffn_chunks", "d_ff", "d_model", "n_heads",
)  # fmt: skip


FINITE_COLUMNS = (
    "seq_len", "batch", "tokens_per_batch", "time_ms_median", "peak_mem_mib", "n_repeats", "rounds", "step",
    "n_layers", "ffn_chunks", "d_ff", "d_model", "n_heads",
)  # fmt: skip


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
    if "cell_key" in frame.columns:
        bad = frame["cell_key"].dropna().map(lambda key: not CELL_KEY_PATTERN.fullmatch(key))
        if bad.any():
            raise ResultsError(f"{source}: cell_key {_short(frame['cell_key'].dropna()[bad].iloc[0])} is not a plain name")
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
        if stored is not None and "cell_key" in stored.columns:
            kept = stored[~stored["cell_key"].astype(str).isin(set(newer["cell_key"]))]
            frame = pd.concat([kept, newer], ignore_index=True) if len(kept) else newer
        else:
            frame = newer
    loaded = set(frame["cell_key"].astype(str)) if frame is not None and "cell_key" in frame.columns else set()
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
    """All rows of the given runs as one DataFrame, with `run_id` and `suite` columns.

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
        for column, value in (("run_id", run_id), ("suite", suite)):
            if column not in frame.columns:
                frame[column] = value
            else:
                frame[column] = frame[column].where(frame[column].notna(), value)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def cell_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` without the rows of single rounds (`row_type` "round"): one row per cell, as the
    report, compare, check, targets and the run summary read a run (a cell measured in rounds has
    its combined row besides its round rows)."""
    if "row_type" not in frame:
        return frame
    return frame[frame["row_type"].astype(object).ne(ROUND_ROW)]


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
        return str(self.info.get("suite") or self.path.parent.name)

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
        name = (self.info.get("environment") or {}).get("device_name")
        if name:
            return str(name)
        names = sorted({str(v) for v in self.rows.get("device_name", pd.Series(dtype=object)).dropna()})
        return ", ".join(names) or "unknown"

    @property
    def code_version(self) -> str:
        """The rows' code versions (comma-separated), else run.json's."""
        versions = sorted({str(v) for v in self.rows.get("code_version", pd.Series(dtype=object)).dropna()})
        return ", ".join(versions) or str(self.info.get("code_version", "unknown"))


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
    loaded = set(rows["cell_key"].astype(str)) if "cell_key" in rows else set()
    return StoredRun(folder, source, info, rows, [f for f in read_cells(folder)[1] if f.stem not in loaded])
