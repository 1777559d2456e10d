"""The writer of a run folder: `RunStore` (the journal, results.parquet, run.json, the run's lock) and run ids.

The files of a run folder: `harness.store.files`.

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

import io
import os
import re
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd

from harness.safe_io import InputFileError, read_json
from harness.store.files import (
    CELL_KEY_PATTERN,
    CELLS_DIR,
    LOCK_FILE,
    PARQUET,
    ROWS_LOCK,
    RUN_ID_PATTERN,
    RUN_INFO,
    RUNNING_DIR,
    ResultsError,
    RunLockedError,
    atomic_write_bytes,
    atomic_write_json,
    flocked,
    fsync_dir,
    is_missing,
    to_json,
)
from harness.store.reader import load_run_info, read_cells, read_rows, read_store_json
from harness.store.schema import CELL_KEY, RUN_ID, STARTED_AT, STATUS, STATUS_ERROR, SUITE

# --------------------------------------------------------------------------- run ids and store


def new_run_id(device_slug: str, parent: str | Path | None = None) -> str:
    """`YYYYmmddTHHMMSSZ-<device_slug>` in UTC. With `parent` (the suite folder) the id is reserved:
    its folder is created atomically (mkdir, no check-then-create race), and a `-2`, `-3`, ...
    suffix is added while a folder of that name already exists, so concurrent starts get distinct ids."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", device_slug).strip("-.") or "device"  # not a column: the fallback slug
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
    owner = load_run_info(folder).get(SUITE)
    if owner is not None and owner != suite:
        raise ResultsError(f"{option} {run_id}: {folder} is a run of suite {owner!r}, not {suite!r}")
    return RunStore(root, suite, run_id)


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
                frame[column] = [None if is_missing(v) else to_json(v, indent=None) for v in frame[column]]
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


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
        with flocked(self.path / f".{RUN_INFO}.lock", blocking=True):
            info = read_store_json(file) if file.exists() else {}
            info.update(fields)
            self.write_run_info(info)

    @contextmanager
    def lock(self, purpose: str = "run") -> Iterator[RunStore]:
        """Hold this run's exclusive lock (an flock on `.lock`, released when the process ends, so
        it is never stale) while running or resuming it. RunLockedError, naming the holder's host,
        pid and start, when another process holds it; nothing is touched then."""
        try:
            with flocked(self.path / LOCK_FILE, blocking=False) as handle:
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
        key = row.get(CELL_KEY)
        if not isinstance(key, str) or not CELL_KEY_PATTERN.fullmatch(key):
            raise ValueError(f"row needs a file-name-safe {CELL_KEY!r}, got {key!r}")
        row = {RUN_ID: self.run_id, SUITE: self.suite, **row}
        atomic_write_json(self.path / CELLS_DIR / f"{key}.json", row)
        try:
            (self.path / RUNNING_DIR / f"{key}.json").unlink()
        except FileNotFoundError:
            pass
        self.rebuild()

    def rebuild(self) -> None:
        """Rewrite results.parquet from its rows and the journal's, under the rows lock (so writers in
        other processes, a pool's training cells say, never lose each other's rows)."""
        with flocked(self.path / ROWS_LOCK, blocking=True):
            self._write_parquet(read_rows(self.path, warn=False))

    def _write_parquet(self, frame: pd.DataFrame | None) -> None:
        atomic_write_bytes(self.path / PARQUET, rows_to_parquet_bytes(frame if frame is not None else []))

    def fold(self) -> None:
        """A finished run: rewrite results.parquet with every row, then empty the journal (the
        readable files; an unreadable one stays, named by `corrupt_cells`, for a resume to redo)."""
        with flocked(self.path / ROWS_LOCK, blocking=True):
            journal, _ = read_cells(self.path)
            self._write_parquet(read_rows(self.path, warn=False))
            self._drop_journal(row[CELL_KEY] for row in journal)

    def _drop_journal(self, keys: Iterable[str]) -> None:
        """Delete the journal files of `keys` (those that exist), durably."""
        for key in keys:
            try:
                (self.path / CELLS_DIR / f"{key}.json").unlink()
            except FileNotFoundError:
                pass
        fsync_dir(self.path / CELLS_DIR)

    def mark_running(self, key: str, **info: Any) -> None:
        """Note that cell `key` is being measured now, by this host and process (`harness status`)."""
        info = {
            CELL_KEY: key,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            STARTED_AT: datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
        with flocked(self.path / ROWS_LOCK, blocking=True):
            frame = read_rows(self.path, warn=False)
            if frame is None or CELL_KEY not in frame or not frame[CELL_KEY].isin(keys).any():
                return
            self._write_parquet(frame[~frame[CELL_KEY].isin(keys)])
            self._drop_journal(keys)

    def rows(self) -> list[dict]:
        """All stored rows (parquet, then the journal's newer ones), each a dict of its non-missing
        columns; unreadable journal files: `corrupt_cells`. An unreadable results.parquet is a
        ResultsError: a run is never continued over rows it cannot read."""
        frame = read_rows(self.path, warn=False)
        if frame is None:
            return []
        return [{k: v for k, v in record.items() if not is_missing(v)} for record in frame.to_dict("records")]

    def finished_keys(self) -> set[str]:
        """cell_keys of stored rows whose status is not "error" (what a resume skips)."""
        return {r[CELL_KEY] for r in self.rows() if r.get(STATUS) != STATUS_ERROR and CELL_KEY in r}
