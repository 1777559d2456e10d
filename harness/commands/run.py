"""`harness run SUITE`: expand a suite into cells, run them into a run folder, summarise.

One path for every kind of suite (benchmark and quality): harness.suites loads it, its cells go to
an executor (harness.executors: local, pool, submitit), which runs the cell runner (harness.runner), each
cell in its own process (harness.isolation), each outcome a row in the run folder
(harness.store). The run folder is opened or created by `open_store` (a `--resume` id must be a
run of that suite), locked for the whole run, and `record_start` writes run.json (or a resume
entry) under the lock; a finished run's rows are folded into results.parquet.
"""

from __future__ import annotations

import argparse
import errno
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd

from harness.analysis.tables import CONTENDED_MARK, is_contended, pivot_metric, quality_summary_tables
from harness.cells import Cell
from harness.commands import UsageError
from harness.data import DataError, check_files
from harness.environment import REPO_ROOT, capture_environment, code_version, device_name, device_slug
from harness.executors import ExecutorError, run_with_executor
from harness.isolation import interrupt_guard
from harness.overrides import Override
from harness.report.document import Block, Document, Heading, Items, Paragraph, Table, to_text
from harness.report.folders import shown_path
from harness.runner import RunOptions, cell_rounds
from harness.safe_yaml import read_yaml_text
from harness.store.files import RUN_INFO
from harness.store.reader import load_run_info
from harness.store.schema import (
    BATCH,
    BATCH_SIZE,
    CODE_VERSION,
    CONFIG_KEY,
    CONTENDED,
    CONTENTION,
    CONTENTION_RETRIES_USED,
    KIND,
    KIND_BENCHMARK,
    KIND_QUALITY,
    MESSAGE,
    PEAK_MEM_MIB,
    ROUND_DRIFT,
    ROW_TYPE,
    SEQ_LEN,
    STARTED_AT,
    STATUS,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_SKIPPED,
    SUITE,
    TASK,
    TASK_PARAMS,
    TIME_MS_MEDIAN,
    TRAIN_CONFIG,
    VARIANT_LABEL,
    VARIANT_PARAMS,
    split,
)
from harness.store.writer import RunStore, new_run_id, resume_store
from harness.suites import Suite, filter_cells
from harness.suites.resolved import changed_cells, config_yaml, load_with_overrides, resume_problem


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


DRY_RUN_HIDDEN = (VARIANT_PARAMS, TASK_PARAMS, TRAIN_CONFIG, CONFIG_KEY, ROW_TYPE, KIND)  # JSON text, shown in labels


def dry_run_table(cells: list[Cell], version: str) -> pd.DataFrame:
    """The cells as a table: label, seq_len, batch, the configuration columns that vary among the
    cells of one label (what the label shows, the variant and its parameters, is not repeated),
    the time estimate (s, all its rounds) and the key."""
    rows = pd.DataFrame([c.to_row() for c in cells]).astype(str)
    first = [c for c in (VARIANT_LABEL, SEQ_LEN, BATCH, BATCH_SIZE) if c in rows]
    by_label = rows.groupby(VARIANT_LABEL)
    varying = [c for c in rows if c not in first and c not in DRY_RUN_HIDDEN and by_label[c].nunique().max() > 1]
    table = rows[first + varying].copy()
    table["estimate_s"] = [round(c.estimate_seconds() * cell_rounds(c), 1) for c in cells]  # every round
    table["key"] = [c.key(version) for c in cells]
    return table


def summary_document(kind: str, rows: pd.DataFrame, suite: str, path: Path) -> Document:
    """What a run prints when it ends: pivot tables of time and memory (benchmark), or accuracy and
    bits-per-dim grids (quality); the cells that did not finish ok; status counts and, where the
    cells watched for contention, how many stayed contended; round drift; where the results are
    (relative to the working directory). Rows of single rounds are left out."""
    parts = split(rows)
    rows = parts.without_rounds
    cells = parts.trains if kind != KIND_BENCHMARK and ROW_TYPE in rows else rows
    blocks: list[Block] = []
    if kind == KIND_BENCHMARK:
        mark = f"({CONTENDED_MARK}: contended, the timing was disturbed by other load on the machine)" if is_contended(rows).any() else ""
        blocks += [
            Heading(f"median time per call (ms), {suite}"),
            Table(pivot_metric(rows, TIME_MS_MEDIAN, mark_contended=True), note=mark),
            Heading("peak memory (MiB)"),
            Table(pivot_metric(rows, PEAK_MEM_MIB)),
        ]
    else:
        for table in quality_summary_tables(rows):
            blocks += [Heading(table.title), Table(table.frame, index=table.index)]
    problems = cells[~cells[STATUS].isin([STATUS_OK, STATUS_SKIPPED])]
    if len(problems):
        lines = []
        for _, row in problems.iterrows():
            first_line = str(row.get(MESSAGE) or "").strip().splitlines()
            reason = first_line[0][:200] if first_line else ""
            # .get: a row of a cell that failed early may lack columns (an images task's seq_len comes from its data)
            where = f"L={row.get(SEQ_LEN)} B={row.get(BATCH)}" if kind == KIND_BENCHMARK else f"({row.get(TASK)} L={row.get(SEQ_LEN, '?')})"
            lines.append(f"{row.get(VARIANT_LABEL)} {where}: {row[STATUS]}: {reason}")
        blocks += [Heading("not ok"), Items(tuple(lines))]
    counts = cells[STATUS].value_counts().to_dict()
    blocks.append(Paragraph(f"{len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items())))
    if CONTENDED in cells:
        blocks += contention_summary(cells)
    drift = pd.to_numeric(cells[ROUND_DRIFT], errors="coerce").dropna() if ROUND_DRIFT in cells else pd.Series(dtype=float)
    if len(drift):
        text = f"round-to-round drift (slowest / fastest round median - 1): median {drift.median():.1%}, largest {drift.max():.1%}"
        blocks.append(Paragraph(text))
    blocks.append(Paragraph(f"results: {shown_path(path)}"))
    return Document(f"{suite} summary", blocks)


def print_summary(kind: str, rows: pd.DataFrame, suite: str, path: Path) -> None:
    """Print `summary_document` as terminal text, after a blank line."""
    print("\n" + to_text(summary_document(kind, rows, suite, path)))


def contention_summary(cells: pd.DataFrame) -> list[Block]:
    """ "3 of 30 cells contended (timings disturbed ...):" and one item per contended cell with its
    reason, or "0 of 30 cells contended" (rows that watched for contention: `contended`)."""
    contended = cells[is_contended(cells)]
    watched = int(cells[CONTENDED].notna().sum())
    if contended.empty:
        return [Paragraph(f"0 of {watched} cells contended")]
    head = (
        f"{len(contended)} of {watched} cells contended (their timings were disturbed by other load and stayed so "
        "after re-measuring; see `contention`):"
    )
    items = []
    for _, row in contended.iterrows():
        retries = int(row.get(CONTENTION_RETRIES_USED) or 0)
        items.append(f"{row[VARIANT_LABEL]} L={row[SEQ_LEN]} B={row[BATCH]}: {row.get(CONTENTION)} (re-measured {retries}x)")
    return [Paragraph(head), Items(tuple(items))]


def open_store(args: argparse.Namespace, suite_name: str, device: str) -> RunStore:
    """The run folder: the existing run named by --resume (a plain run id of this suite under
    --out), else a new one whose id is reserved atomically. Writes nothing else."""
    out = Path(args.out)
    run_id = None
    try:
        if args.resume:
            return resume_store(out, suite_name, args.resume)
        run_id = new_run_id(device_slug(device_name(device)), parent=out / suite_name)
        return RunStore(out, suite_name, run_id)
    except OSError as error:
        if run_id is not None:  # reserved by this command and empty: leave no run folder without run.json
            shutil.rmtree(out / suite_name / run_id, ignore_errors=True)
        raise UsageError(f"cannot write results under {args.out}: {error.strerror or error}; nothing was run") from None


def record_start(args: argparse.Namespace, store: RunStore, run_info: dict, environment: Callable[[], dict]) -> None:
    """Under the run's lock: a new run's run.json (`run_info` plus suite text, command, start and
    `environment()`), or a resumed run's `resumes` entry with `run_info`'s planned cells.
    Unreadable cell files are named."""
    if args.resume:
        resumes = load_run_info(store.path).get("resumes", [])
        planned = {k: v for k, v in run_info.items() if k in ("cell_keys", "cell_labels")}
        store.update_run_info(
            resumes=[*resumes, {"at": _now(), CODE_VERSION: run_info[CODE_VERSION], "command": command_line(args)}], **planned
        )
        for file in store.corrupt_cells():
            print(f"warning: {file}: unreadable cell file; that cell is measured again", file=sys.stderr)
        return
    store.write_run_info(
        {
            SUITE: store.suite,
            "suite_path": str(args.suite),
            "suite_text": read_yaml_text(args.suite, "suite file"),
            **run_info,
            "command": command_line(args),
            STARTED_AT: _now(),
            "environment": environment(),
        }
    )


def planned_cells(cells: list[Cell], version: str) -> dict:
    """run.json fields listing the cells a run plans (what `harness status` counts as pending)."""
    keys = [c.key(version) for c in cells]
    return {"cell_keys": keys, "cell_labels": {k: " ".join(c.describe().split()) for k, c in zip(keys, cells)}}


def _slurm_settings(args: argparse.Namespace, suite: Suite) -> dict:
    """The suite's `slurm:` block with the --slurm-* options over it."""
    slurm = dict(suite.slurm)
    for name in ("partition", "time_min", "gpus_per_node", "array_parallelism"):
        value = getattr(args, f"slurm_{name}")
        if value is not None:
            slurm[name] = value
    return slurm


def command_line(args: argparse.Namespace) -> str:
    """This command as typed (`python -m harness run ...`), for run.json."""
    return "python -m harness " + shlex.join(args.argv)


def resume_command(args: argparse.Namespace, run_id: str) -> str:
    """The command that continues run `run_id`: this one's arguments (--out, --device, --filter ...
    included) without --resume, --dry-run or --report, plus `--resume run_id`."""
    kept, skip = [], False
    for argument in args.argv:
        if skip:
            skip = False
        elif argument == "--resume":
            skip = True
        elif not argument.startswith("--resume=") and argument not in ("--dry-run", "--report", "--print-config"):
            kept.append(argument)
    return "python -m harness " + shlex.join([*kept, "--resume", run_id])


def check_task_files(args: argparse.Namespace, suite: Suite) -> None:
    """A quality suite's data files exist (harness.data.check_files): a UsageError if not, a
    warning with --dry-run. Benchmark suites read no files."""
    if suite.kind != KIND_QUALITY:
        return
    try:
        check_files(suite.task)
    except DataError as error:
        if not args.dry_run:
            raise UsageError(f"{args.suite}: task {suite.task['name']!r}: {error}") from None
        print(f"warning: {error}", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    """`harness run SUITE` for a suite of any kind: load, select, then dry-run or run and summarise."""
    suite, overrides = load_with_overrides(args.suite, args.set, device=args.device)
    if args.print_config:
        print(config_yaml(suite, overrides), end="")
        return 0
    cells: list[Cell] = suite.cells()
    if args.threads is not None:
        cells = [c.with_threads(args.threads) for c in cells]
    if args.filter:
        cells = filter_cells(cells, args.filter)
    if not cells:
        raise UsageError(f"{args.suite}: no cells to run (after --filter {args.filter!r})" if args.filter else f"{args.suite}: no cells")
    check_task_files(args, suite)
    version = code_version(REPO_ROOT)
    if args.dry_run:
        table = dry_run_table(cells, version)
        if overrides:
            table.insert(0, "set", ["changed" if c else "" for c in changed_cells(args.suite, args.device, cells)])
        print(table.to_string(index=False))
        print(f"{len(cells)} {suite.kind} cells on {suite.device}; rough estimate {table['estimate_s'].sum() / 60:.1f} min")
        if overrides:
            changed = int((table["set"] == "changed").sum())
            print(f"--set {' --set '.join(o.text for o in overrides)}: {changed} of {len(cells)} cells changed (marked `changed`)")
        return 0
    if suite.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"{args.suite}: device {suite.device!r}, but CUDA is not available here (try --device cpu)")
    if args.in_process and args.executor != "local":
        raise UsageError(f"--in-process runs cells one at a time in this process: not with --executor {args.executor}")
    store = open_store(args, suite.name, suite.device)
    if args.resume:
        problem = resume_problem(args.suite, args.device, load_run_info(store.path), suite, overrides)
        if problem:
            raise UsageError(f"--resume {args.resume}: {problem}")
    options = RunOptions(code_version=version, run_id=store.path.name, in_process=args.in_process)
    began = time.monotonic()
    try:
        return _run(args, suite, cells, store, options, version, began, overrides)
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        print(f"error: {write_failure(args, store, error)}", file=sys.stderr)
        return 2


# A write to the run folder failed for a reason of the place, not of the code: disk or quota full,
# a read-only mount, no permission, an I/O error.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG})


def write_failure(args: argparse.Namespace, store: RunStore, error: OSError) -> str:
    """The message after a failed write in run `store` (ENOSPC, EROFS, ...): where and why, and what
    happens next. A new run with no run.json yet is removed (it holds nothing); any other run keeps
    its finished cells, and the message ends in the exact command that continues it."""
    why = f"{error.strerror or error} ({errno.errorcode.get(error.errno, error.errno)})"
    where = error.filename or store.path
    if not args.resume and not (store.path / RUN_INFO).exists():
        shutil.rmtree(store.path, ignore_errors=True)  # reserved by this command, nothing in it yet
        return f"cannot write to {where}: {why}; nothing was run and no run folder is left. Free space or fix the place, then run again"
    try:
        store.update_run_info(interrupted_at=_now())
    except OSError:
        pass  # the same fault: run.json keeps its last state
    return (
        f"cannot write to {where}: {why}. The cells finished before it are saved in {store.path}; "
        f"free space or fix the place, then continue with: {resume_command(args, store.path.name)}"
    )


def _run(
    args: argparse.Namespace,
    suite: Suite,
    cells: list[Cell],
    store: RunStore,
    options: RunOptions,
    version: str,
    began: float,
    overrides: list[Override],
) -> int:
    """The run itself, under the run's lock: record the start, run the cells, fold, summarise."""
    with store.lock("harness run"), interrupt_guard():
        record_start(
            args,
            store,
            {
                KIND: suite.kind,
                "description": suite.description,
                CODE_VERSION: version,
                "n_cells": len(cells),
                **planned_cells(cells, version),
                "executor": args.executor,
                "overrides": [o.as_record() for o in overrides],
            },
            environment=lambda: capture_environment(suite.device),
        )
        try:
            finished = store.finished_keys()
            done = sum(c.key(version) in finished for c in cells)
            if args.resume:
                print(f"resuming {store.path}: {done} of {len(cells)} cells already done with code version {version}")
            print(
                f"running {len(cells) - done} of {len(cells)} cells of {suite.kind} suite {suite.name!r} on {suite.device} "
                f"({args.executor}) -> {store.path}",
                flush=True,
            )
            new_rows = run_with_executor(
                args.executor,
                cells,
                store,
                options,
                device=suite.device,
                workers=args.workers,
                slurm=_slurm_settings(args, suite),
                cluster=args.submitit_cluster,
            )
        except ExecutorError as error:
            raise UsageError(str(error)) from None
        except KeyboardInterrupt:
            store.update_run_info(interrupted_at=_now())
            if args.executor == "submitit":  # the jobs go on: a resume now would measure their cells twice
                print(
                    f"\ninterrupted; the jobs keep running (see above). Once they have ended, continue with: "
                    f"{resume_command(args, store.path.name)}",
                    file=sys.stderr,
                )
            else:
                print(
                    f"\ninterrupted; finished cells (and training checkpoints) are saved. Continue with: "
                    f"{resume_command(args, store.path.name)}",
                    file=sys.stderr,
                )
            return 130
        store.fold()  # finished: every row once, in results.parquet (also when nothing ran)
        store.update_run_info(finished_at=_now(), wall_s=round(time.monotonic() - began, 1))
    if not new_rows:
        print("nothing to run: every cell is already finished")
    print_summary(suite.kind, pd.DataFrame(store.rows()), suite.name, store.path)
    if args.report:
        from harness.report import render_report

        report = render_report([store.path], out=None, root=args.out)
        print(f"report: {report}")
    for target in args.export or []:
        from harness.export import export_run

        print(f"export ({target}): {export_run(store.path, target, root=args.out)}")
    if new_rows and all(row[STATUS] == STATUS_ERROR for row in new_rows):
        print("error: every cell failed with an error (see the messages above); nothing was measured", file=sys.stderr)
        return 1
    return 0
