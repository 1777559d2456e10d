"""The store's files: the run folder's names, its errors, atomic writes, file modes, locks, JSON.

Layout of a run folder::

    <root>/<suite>/<run_id>/run.json            environment + suite + command
    <root>/<suite>/<run_id>/results.parquet     the rows (rewritten after every row)
    <root>/<suite>/<run_id>/cells/<key>.json    the journal: rows written since the run last finished
    <root>/<suite>/<run_id>/running/<key>.json  a cell being measured now (host, pid, job)
    <root>/<suite>/<run_id>/jobs.json           submitted Slurm jobs (harness.executors)
    <root>/<suite>/<run_id>/.lock               held (flock) by the one process running the run

Every file of a run is written to a temporary file in the same folder and renamed over the target
(`atomic_write_bytes`), so readers never see a torn file; files are made with the modes `open()`
would give (`file_mode`), and the run's locks are flocks (`flocked`), released when the process ends.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import numpy as np

RUN_INFO = "run.json"
CELLS_DIR = "cells"
RUNNING_DIR = "running"  # running/<key>.json: a cell being measured now (host, pid, job), gone once stored
PARQUET = "results.parquet"
LOCK_FILE = ".lock"
BASELINES_DIR = "baselines"  # <results root>/baselines/<device slug>/<name>/: promoted runs (harness.check.baseline)
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
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
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
    raise TypeError(f"not JSON serialisable: {type(value).__name__} {value!r}")


def to_json(data: Any, indent: int | None = 2) -> str:
    """JSON text of `data`; numpy scalars/arrays, tuples, sets and paths are converted."""
    return json.dumps(data, indent=indent, default=_json_default, sort_keys=False)


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Atomically write `data` as indented JSON to `path`."""
    atomic_write_text(path, to_json(data) + "\n")


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@contextmanager
def flocked(path: Path, blocking: bool) -> Iterator[Any]:
    """An open handle on `path` holding an exclusive flock; BlockingIOError when not `blocking` and taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    with os.fdopen(fd, "r+", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield handle
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
