"""The cell runner: the cells of a run still to do, run one by one (or by an executor, several at once),
each in its own process (`harness.isolation`), each outcome stored as its row.

What it shares across the cells of a run: resume (a cell whose row is stored with a status other
than `error` for this code version is not run again), replacing rows of an older code version,
skip-after-failure within a group (after `oom` / `timeout` at one length, longer lengths of the
same configuration are recorded `skipped`), and progress with an ETA. It works on any cell that
implements the protocol of `harness.cells` (benchmark and training cells alike).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from harness.cells import Cell, execute_in_cell_process
from harness.isolation import run_isolated
from harness.safe_io import terminal_text
from harness.store.schema import (
    CELL_KEY,
    CELL_WALL_S,
    CODE_VERSION,
    MESSAGE,
    ROUND,
    ROUND_DRIFT,
    ROUND_ROW,
    ROUNDS,
    ROW_TYPE,
    RUN_ID,
    STARTED_AT,
    STATUS,
    STATUS_OK,
    STATUS_OOM,
    STATUS_SKIPPED,
    STATUS_TIMEOUT,
    SUITE,
)

if TYPE_CHECKING:  # pandas is not imported into cell processes: it would slow every start
    from harness.store.writer import RunStore

FAILED_STATUSES = (STATUS_OOM, STATUS_TIMEOUT)  # statuses after which longer lengths of a group are skipped


def cell_rounds(cell: Cell) -> int:
    """How many rounds the runner measures `cell` in: its `measure_rounds()`, 1 for cells without one."""
    rounds = getattr(cell, "measure_rounds", None)
    return max(1, int(rounds())) if callable(rounds) else 1


def round_key(key: str, round_number: int) -> str:
    """The `cell_key` of round `round_number` of cell `key`'s rows: "<key>-r<round>"."""
    return f"{key}-r{round_number}"


@dataclass
class RunOptions:
    """How the runner treats cells: isolation, code identity, where progress lines go."""

    code_version: str
    run_id: str
    in_process: bool = False
    print_line: Callable[[str], None] = field(default=lambda line: print(line, flush=True))


# --------------------------------------------------------------------------- the runner


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(done: int, total: int, eta_s: float, cell: Cell, row: dict[str, Any], round_text: str = "") -> str:
    """ "[####----]  3/30 ETA 1m20s | <cell> <outcome>": the line printed as each cell (or round of
    a cell, `round_text` "r2/3 ") ends, control characters of labels and messages escaped."""
    width = 20
    filled = int(width * done / max(total, 1))
    bar = "#" * filled + "-" * (width - filled)
    if row[STATUS] == STATUS_OK:
        result = cell.progress_text(row)
        if isinstance(row.get(ROUND_DRIFT), float):
            result += f"  ({row.get(ROUNDS)} rounds, drift {100 * row[ROUND_DRIFT]:.1f}%)"
    else:
        message = str(row.get(MESSAGE) or "")
        result = f"{row[STATUS].upper()}  {message.splitlines()[0][:70] if message else ''}"
    return terminal_text(f"[{bar}] {done:>3}/{total} ETA {_format_eta(eta_s):>7} | {round_text}{cell.describe()} {result}")


LONG_CELL_S = 60.0  # cells estimated to take longer get a line when they start, not only when they end


def stale_keys(cells: list[Cell], rows: list[dict], code_version: str) -> dict[str, list[str]]:
    """Current key of a cell -> keys of stored `rows` holding the same cell (or one of its rounds)
    under another code version."""
    stored = {r.get(CELL_KEY) for r in rows}
    versions = {r.get(CODE_VERSION) for r in rows} - {code_version, None}
    out: dict[str, list[str]] = {}
    for cell in cells:
        candidates = [cell.key(version) for version in sorted(versions)]
        candidates += [round_key(key, n) for key in candidates for n in range(1, cell_rounds(cell) + 1)]
        old = [key for key in candidates if key in stored]
        if old:
            out[cell.key(code_version)] = old
    return out


class CellRunner:
    """The cells of one `run_cells` call still to run, and what they share: resume state, skips
    after OOM, stale rows to replace, rounds, progress and ETA. `run_one` is thread-safe so
    executors can run several groups at once (the cells of one group must run in order, in one thread).

    Rounds (a cell's `measure_rounds()` > 1, docs/decisions.md): round 1 measures the cells in suite
    order (skip-after-OOM is decided there), rounds 2..K the cells whose first round ended ok, in a
    seeded shuffled order (`round_cells`). Each round of such a cell is stored as its own row
    (`round_key`, `row_type` "round"); once all its rounds are stored, the cell's own row
    (`cell.combine_rounds`) is stored under its key. A round that does not end ok ends the cell: its
    row is stored under the key, with the round named in `message`. A resume measures only the
    rounds not yet stored ok."""

    def __init__(self, cells: list[Cell], store: RunStore, options: RunOptions):
        self.store, self.options = store, options
        self.version = version = options.code_version
        stored = {r[CELL_KEY]: r for r in store.rows() if CELL_KEY in r}
        finished = store.finished_keys()
        self.stale = stale_keys(cells, list(stored.values()), version)
        done_stale = [key for cell in cells if cell.key(version) in finished for key in self.stale.get(cell.key(version), [])]
        if done_stale:  # left by a run killed between writing a new row and removing the old one
            store.remove(done_stale)
        self.failed_groups: dict[str, tuple[int, str]] = {}  # group -> (shortest failing seq_len, why)
        for cell in cells:
            row = stored.get(cell.key(version))
            if row is not None:
                self.note_failure(cell, str(row.get(STATUS)))
        self.cells = list(cells)
        self.pending = [c for c in cells if c.key(version) not in finished]
        self.rounds = {c.key(version): cell_rounds(c) for c in cells}
        self.max_rounds = max(self.rounds.values(), default=1)
        self.round_rows: dict[str, dict[int, dict]] = {}  # key -> round -> its stored ok row
        self.todo: dict[str, list[int]] = {}  # key -> rounds still to measure
        for cell in self.pending:
            key = cell.key(version)
            if self.rounds[key] > 1:
                keys = {n: round_key(key, n) for n in range(1, self.rounds[key] + 1)}
                self.round_rows[key] = {n: stored[k] for n, k in keys.items() if stored.get(k, {}).get(STATUS) == STATUS_OK}
            self.todo[key] = [n for n in range(1, self.rounds[key] + 1) if n not in self.round_rows.get(key, {})]
        self.ended: set[str] = set()  # pending cells whose own row this runner has stored
        self.total = sum(len(t) for t in self.todo.values())  # measurements (cells x rounds) to make
        self.estimates = {c.key(version): c.estimate_seconds() for c in self.pending}
        self.remaining_estimate = sum(self.estimates[k] * len(t) for k, t in self.todo.items())
        self.spent_estimate = 0.0
        self.run_time = 0.0  # wall time of the cells actually run, to rescale the remaining estimate
        self.done = 0
        self.rows: list[dict] = []
        self.stopped = threading.Event()  # set on interrupt: rows of killed cells are not stored
        self._lock = threading.Lock()
        for cell in self.pending:  # every round stored, the cell's own row not: killed in between
            if self.rounds[cell.key(version)] > 1 and not self.todo[cell.key(version)]:
                self._store_final(cell.key(version), self._combined(cell))

    def note_failure(self, cell: Cell, status: str) -> None:
        """Remember a failure after which longer lengths of `cell`'s group are skipped."""
        if not cell.skip_after_failure() or cell.seq_len is None:
            return
        group = cell.group_key()
        if status in FAILED_STATUSES and (group not in self.failed_groups or cell.seq_len < self.failed_groups[group][0]):
            self.failed_groups[group] = (cell.seq_len, f"{status} at L={cell.seq_len}")

    def groups(self) -> list[list[Cell]]:
        """The pending cells by group (first-appearance order), each group in suite order (seq_len ascending)."""
        return _grouped(self.pending)

    def round_cells(self, number: int) -> list[Cell]:
        """The cells to measure in round `number`: round 1 in suite order; a later round the cells
        whose first round ended ok, in an order shuffled with the run's seed (`round_seed()` of its
        first cell; the same order on a resume, which runs the rest of it)."""
        version = self.version
        wanted = [c for c in self.pending if number in self.todo[c.key(version)] and c.key(version) not in self.ended]
        if number == 1:
            return wanted
        wanted = [c for c in wanted if 1 in self.round_rows.get(c.key(version), {})]
        seed = getattr(self.cells[0], "round_seed", lambda: 0)() if self.cells else 0
        order = [c.key(version) for c in self.cells if self.rounds[c.key(version)] >= number]
        random.Random(f"{seed}:{number}").shuffle(order)
        rank = {key: i for i, key in enumerate(order)}
        return sorted(wanted, key=lambda c: rank[c.key(version)])

    def round_groups(self, number: int) -> list[list[Cell]]:
        """`round_cells(number)` as the units an executor hands out: round 1 by group (skip-after-OOM
        needs a group in order), later rounds one cell each, in their shuffled order."""
        cells = self.round_cells(number)
        return _grouped(cells) if number == 1 else [[cell] for cell in cells]

    def run_one(self, cell: Cell, env: dict[str, str] | None = None, number: int = 1) -> dict | None:
        """Run (or skip) round `number` of one pending cell, store its row (and, after its last
        round, the cell's own row) and print progress; the row stored, None once stopped."""
        if self.stopped.is_set():
            return None
        key = cell.key(self.version)
        rounds = self.rounds[key]
        begin = time.monotonic()
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            failed = self.failed_groups.get(cell.group_key())
        if number == 1 and failed and cell.seq_len is not None and cell.seq_len > failed[0]:
            metrics, ran = {STATUS: STATUS_SKIPPED, MESSAGE: f"skipped after {failed[1]}"}, False
        else:
            self.store.mark_running(key, **({ROUND: number} if rounds > 1 else {}))
            if self.estimates[key] > LONG_CELL_S:
                self.options.print_line(f"starting {cell.describe()} (key {key}, estimate {_format_eta(self.estimates[key])})")
            metrics = self.execute(cell, env)
            ran = True
        if self.stopped.is_set():  # killed by the interrupt: not a result
            return None
        row = {
            **cell.to_row(),
            RUN_ID: self.options.run_id,
            SUITE: cell.suite,
            CELL_KEY: key,
            CODE_VERSION: self.version,
            STARTED_AT: stamp,
            CELL_WALL_S: time.monotonic() - begin,
            **metrics,
        }
        with self._lock:
            self.note_failure(cell, metrics[STATUS])
            self.todo[key].remove(number)
            self.remaining_estimate -= self.estimates[key]
            if ran:
                self.spent_estimate += self.estimates[key]
                self.run_time += time.monotonic() - begin
            final = self._record(cell, row, number)
            self.done += 1
            # ETA: the remaining a-priori estimates, rescaled by how far off they have been so far.
            eta = self.remaining_estimate * (self.run_time / self.spent_estimate if self.spent_estimate else 1.0)
            shown = final if final is not None else row
            round_text = f"r{number}/{rounds} " if rounds > 1 else ""
            self.options.print_line(progress_line(self.done, self.total, eta, cell, shown, round_text))
        return final if final is not None else row

    def _record(self, cell: Cell, row: dict, number: int) -> dict | None:
        """Store round `number`'s `row` of `cell` (under the lock): the cell's own row when this
        ends the cell (one round, a failure, or its last round: returned), else a round row."""
        key, rounds = row[CELL_KEY], self.rounds[row[CELL_KEY]]
        if rounds == 1:
            self._store_final(key, row)
            return row
        if row[STATUS] != STATUS_OK:  # the cell ends here: its later rounds are not measured
            dropped = len(self.todo[key])
            self.todo[key].clear()
            self.total -= dropped
            self.remaining_estimate -= dropped * self.estimates[key]
            message = f"round {number} of {rounds}: {row.get(MESSAGE) or ''}".strip()
            final = {**row, ROUND: number, ROUNDS: rounds, MESSAGE: message}
            self._store_final(key, final)
            return final
        row.update({CELL_KEY: round_key(key, number), ROW_TYPE: ROUND_ROW, ROUND: number, ROUNDS: rounds})
        self.store.append(row)
        self.store.clear_running(key)
        self.round_rows[key][number] = row
        if self.todo[key]:
            return None
        final = self._combined(cell)
        self._store_final(key, final)
        return final

    def _combined(self, cell: Cell) -> dict:
        """The cell's own row from its stored round rows (`cell.combine_rounds`)."""
        key = cell.key(self.version)
        rows = [self.round_rows[key][n] for n in sorted(self.round_rows[key])]
        return {**cell.combine_rounds(rows), CELL_KEY: key}

    def _store_final(self, key: str, row: dict) -> None:
        """Store a cell's own row (replacing rows of it from older code versions); it ends the cell."""
        self.store.append(row)
        if self.stale.get(key):
            self.store.remove(self.stale[key])
        self.rows.append(row)
        self.ended.add(key)

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


def _grouped(cells: list[Cell]) -> list[list[Cell]]:
    """`cells` by `group_key()`, groups in first-appearance order, each in the order given."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.group_key(), []).append(cell)
    return list(groups.values())


def run_cells(cells: list[Cell], store: RunStore, options: RunOptions) -> list[dict]:
    """Run the `cells` that `store` does not already hold (for this code version), one at a time,
    and append one row per cell; return the new rows (the cells' own rows, not their round rows).

    A cell already stored with status other than `error` is not run again (resume). A stored row of
    the same cell under another code version is replaced by the new row. After a cell ends `oom` or
    `timeout`, longer lengths of its group (same config but seq_len/batch) are recorded as
    `skipped` when the cell says so (`skip_after_failure`), also across a resume. Cells measured in
    rounds run round after round (`CellRunner.round_cells`). harness.executors runs the same `CellRunner` in
    parallel.
    """
    runner = CellRunner(cells, store, options)
    for number in range(1, runner.max_rounds + 1):
        for cell in runner.round_cells(number):
            runner.run_one(cell, number=number)
    return runner.rows
