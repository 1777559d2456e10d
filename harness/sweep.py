"""The sweep: the cells of a run still to do, run one by one (or by an executor, several at once),
each in its own process (`harness.isolation`), each outcome stored as its row.

What it shares across the cells of a run: resume (a cell whose row is stored with a status other
than `error` for this code version is not run again), replacing rows of an older code version,
skip-after-failure within a group (after `oom` / `timeout` at one length, longer lengths of the
same configuration are recorded `skipped`), and progress with an ETA. It works on any cell that
implements the protocol of `harness.cells` (benchmark and training cells alike).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from harness.cells import Cell, execute_in_cell_process
from harness.isolation import run_isolated

if TYPE_CHECKING:  # pandas is not imported into cell processes: it would slow every start
    from harness.results import RunStore

FAILED_STATUSES = ("oom", "timeout")  # statuses after which longer lengths of a group are skipped


@dataclass
class RunOptions:
    """How the runner treats cells: isolation, code identity, where progress lines go."""

    code_version: str
    run_id: str
    in_process: bool = False
    print_line: Callable[[str], None] = field(default=lambda line: print(line, flush=True))


# --------------------------------------------------------------------------- the sweep


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(done: int, total: int, eta_s: float, cell: Cell, row: dict[str, Any]) -> str:
    """ "[####----]  3/30 ETA 1m20s | <cell> <outcome>": the line printed as each cell ends."""
    width = 20
    filled = int(width * done / max(total, 1))
    bar = "#" * filled + "-" * (width - filled)
    if row["status"] == "ok":
        result = cell.progress_text(row)
    else:
        message = str(row.get("message") or "")
        result = f"{row['status'].upper()}  {message.splitlines()[0][:70] if message else ''}"
    return f"[{bar}] {done:>3}/{total} ETA {_format_eta(eta_s):>7} | {cell.describe()} {result}"


LONG_CELL_S = 60.0  # cells estimated to take longer get a line when they start, not only when they end


def stale_keys(cells: list[Cell], rows: list[dict], code_version: str) -> dict[str, list[str]]:
    """Current key of a cell -> keys of stored `rows` holding the same cell under another code version."""
    stored = {r.get("cell_key") for r in rows}
    versions = {r.get("code_version") for r in rows} - {code_version, None}
    out: dict[str, list[str]] = {}
    for cell in cells:
        old = [key for version in sorted(versions) if (key := cell.key(version)) in stored]
        if old:
            out[cell.key(code_version)] = old
    return out


class Sweep:
    """The cells of one `run_cells` call still to run, and what they share: resume state, skips
    after OOM, stale rows to replace, progress and ETA. `run_one` is thread-safe so executors can
    run several groups at once (the cells of one group must run in order, in one thread)."""

    def __init__(self, cells: list[Cell], store: RunStore, options: RunOptions):
        self.store, self.options = store, options
        self.version = version = options.code_version
        stored = {r["cell_key"]: r for r in store.rows() if "cell_key" in r}
        finished = store.finished_keys()
        self.stale = stale_keys(cells, list(stored.values()), version)
        done_stale = [key for cell in cells if cell.key(version) in finished for key in self.stale.get(cell.key(version), [])]
        if done_stale:  # left by a run killed between writing a new row and removing the old one
            store.remove(done_stale)
        self.failed_groups: dict[str, tuple[int, str]] = {}  # group -> (shortest failing seq_len, why)
        for cell in cells:
            row = stored.get(cell.key(version))
            if row is not None:
                self.note_failure(cell, str(row.get("status")))
        self.pending = [c for c in cells if c.key(version) not in finished]
        self.estimates = {c.key(version): c.estimate_seconds() for c in self.pending}
        self.remaining_estimate = sum(self.estimates.values())
        self.spent_estimate = 0.0
        self.run_time = 0.0  # wall time of the cells actually run, to rescale the remaining estimate
        self.done = 0
        self.rows: list[dict] = []
        self.stopped = threading.Event()  # set on interrupt: rows of killed cells are not stored
        self._lock = threading.Lock()

    def note_failure(self, cell: Cell, status: str) -> None:
        """Remember a failure after which longer lengths of `cell`'s group are skipped."""
        if not cell.skip_after_failure() or cell.seq_len is None:
            return
        group = cell.group_key()
        if status in FAILED_STATUSES and (group not in self.failed_groups or cell.seq_len < self.failed_groups[group][0]):
            self.failed_groups[group] = (cell.seq_len, f"{status} at L={cell.seq_len}")

    def groups(self) -> list[list[Cell]]:
        """The pending cells by group (first-appearance order), each group in suite order (seq_len ascending)."""
        groups: dict[str, list[Cell]] = {}
        for cell in self.pending:
            groups.setdefault(cell.group_key(), []).append(cell)
        return list(groups.values())

    def run_one(self, cell: Cell, env: dict[str, str] | None = None) -> dict | None:
        """Run (or skip) one pending cell, store its row and print progress; None once stopped."""
        if self.stopped.is_set():
            return None
        key = cell.key(self.version)
        begin = time.monotonic()
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            failed = self.failed_groups.get(cell.group_key())
        if failed and cell.seq_len is not None and cell.seq_len > failed[0]:
            metrics, ran = {"status": "skipped", "message": f"skipped after {failed[1]}"}, False
        else:
            self.store.mark_running(key)
            if self.estimates[key] > LONG_CELL_S:
                self.options.print_line(f"starting {cell.describe()} (key {key}, estimate {_format_eta(self.estimates[key])})")
            metrics = self.execute(cell, env)
            ran = True
        if self.stopped.is_set():  # killed by the interrupt: not a result
            return None
        row = {
            **cell.to_row(),
            "run_id": self.options.run_id,
            "suite": cell.suite,
            "cell_key": key,
            "code_version": self.version,
            "started_at": stamp,
            "cell_wall_s": time.monotonic() - begin,
            **metrics,
        }
        with self._lock:
            self.note_failure(cell, metrics["status"])
            self.remaining_estimate -= self.estimates[key]
            if ran:
                self.spent_estimate += self.estimates[key]
                self.run_time += time.monotonic() - begin
            self.store.append(row)
            if self.stale.get(key):
                self.store.remove(self.stale[key])
            self.rows.append(row)
            self.done += 1
            # ETA: the remaining a-priori estimates, rescaled by how far off they have been so far.
            eta = self.remaining_estimate * (self.run_time / self.spent_estimate if self.spent_estimate else 1.0)
            self.options.print_line(progress_line(self.done, len(self.pending), eta, cell, row))
        return row

    def execute(self, cell: Cell, env: dict[str, str] | None) -> dict[str, Any]:
        """The cell's outcome columns: `cell.execute` in this process (--in-process: no memory
        limit, no isolation), else in its own process (`isolation.run_isolated`) with `env` set."""
        store, version = self.store, self.version
        if self.options.in_process:
            return cell.execute(str(store.root), store.suite, store.run_id, version, False, None)
        return execute_isolated(cell, str(store.root), store.run_id, version, env)


def execute_isolated(cell: Cell, root: str, run_id: str, code_version: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`cell.execute` in a fresh spawned process (`isolation.run_isolated`: its memory limit and
    timeout, parent-death, signals, crash -> row), writing any rows of its own into run
    root/<cell.suite>/run_id; the outcome columns of its row."""
    work_args = (cell, root, cell.suite, run_id, code_version)
    return run_isolated(execute_in_cell_process, work_args, cell.timeout_s(), cell.memory_limit_bytes(), env)


def run_cells(cells: list[Cell], store: RunStore, options: RunOptions) -> list[dict]:
    """Run the `cells` that `store` does not already hold (for this code version), one at a time,
    and append one row per cell; return the new rows.

    A cell already stored with status other than `error` is not run again (resume). A stored row of
    the same cell under another code version is replaced by the new row. After a cell ends `oom` or
    `timeout`, longer lengths of its group (same config but seq_len/batch) are recorded as
    `skipped` when the cell says so (`skip_after_failure`), also across a resume. harness.executors
    runs the same `Sweep` in parallel.
    """
    sweep = Sweep(cells, store, options)
    for cell in sweep.pending:
        sweep.run_one(cell)
    return sweep.rows
