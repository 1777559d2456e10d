"""The runs under a results root: `find_runs` -> one `RunEntry` per run folder (suites' runs and
promoted baselines), with what `harness runs`, `harness history` and `harness publish` need to know.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from harness.analysis.tables import is_contended
from harness.store.files import BASELINES_DIR, PARQUET, RUN_INFO, CorruptCellWarning, ResultsError
from harness.store.reader import StoredRun, read_run
from harness.store.schema import STARTED_AT, STATUS, STATUS_OK, split
from harness.store.versions import commit_time


@dataclass(frozen=True)
class RunEntry:
    """One stored run: the run itself (`StoredRun`, rows loaded), whether it is a promoted baseline, its
    code version's commit time (Unix s, None when git does not know it) and its cell counts: ok,
    failed (stored with another status), contended (ok but disturbed) and unfinished (planned in
    run.json, not stored)."""

    run: StoredRun
    baseline: bool
    commit_time: int | None
    ok: int
    failed: int
    contended: int
    unfinished: int

    @property
    def suite(self) -> str:
        return self.run.suite

    @property
    def started(self) -> str:
        """run.json's start time (ISO 8601), "" when it has none."""
        return str(self.run.info.get(STARTED_AT) or "")

    @property
    def commit_date(self) -> str:
        """The commit date of the code version (UTC, minutes), "" when git does not know it."""
        if self.commit_time is None:
            return ""
        return datetime.fromtimestamp(self.commit_time, timezone.utc).strftime("%Y-%m-%d %H:%M")


def entry_of(run: StoredRun, baseline: bool) -> RunEntry:
    """The RunEntry of an opened run."""
    kinds = split(run.rows)
    own = kinds.own_rows if not kinds.own_rows.empty or not kinds.is_quality else kinds.evals  # older quality runs: no train rows
    status = own[STATUS] if STATUS in own else own.index.to_series().map(lambda _: None)
    ok = int((status == STATUS_OK).sum())
    contended = int((is_contended(own) & (status == STATUS_OK)).sum())
    planned = len(run.info.get("cell_keys") or [])
    unfinished = max(planned - len(own), 0)
    return RunEntry(run, baseline, commit_time(run.code_version.split(",")[0]), ok, len(own) - ok, contended, unfinished)


def _run_folders(root: Path) -> list[tuple[Path, bool]]:
    folders: list[tuple[Path, bool]] = []
    for suite in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        baseline = suite.name == BASELINES_DIR
        candidates = suite.glob("*/*") if baseline else suite.iterdir()  # baselines/<device>/<name>/
        for folder in sorted(candidates):
            if folder.is_dir() and ((folder / RUN_INFO).exists() or (folder / PARQUET).exists()):
                folders.append((folder, baseline))
    return folders


def find_runs(root: str | Path, suite: str | None = None, problems: list[str] | None = None) -> list[RunEntry]:
    """Every run folder under `root` (its suites' runs, then its baselines), of `suite` only when given,
    ordered by suite and start. A run that cannot be read is left out and named in `problems`."""
    root = Path(root)
    if not root.is_dir():
        raise ResultsError(f"{root}: results folder not found")
    entries = []
    for folder, baseline in _run_folders(root):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CorruptCellWarning)
                run = read_run(folder, root)
        except ResultsError as error:
            if problems is not None:
                problems.append(str(error))
            continue
        if suite is None or run.suite == suite:
            entries.append(entry_of(run, baseline))
    return sorted(entries, key=lambda e: (e.suite, e.baseline, e.started, e.run.run_id))
