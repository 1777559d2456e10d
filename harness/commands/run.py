"""`harness run SUITE`: expand a suite into cells, run them into a run folder, summarise.

Both kinds of suite go through here: benchmark suites (harness.suite) and quality suites
(`kind: quality`, harness.quality). The run folder is opened or created by `open_store`
(a `--resume` id must be a run of that suite), locked for the whole run, and `record_start`
writes run.json (or a resume entry) under the lock.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd

from harness.commands import REPO_ROOT, UsageError
from harness.data import DataError, check_files
from harness.environment import capture_environment, code_version, device_name, device_slug
from harness.quality import estimate_seconds as estimate_training_seconds
from harness.quality import is_quality_suite, load_quality_suite, run_quality_cells, summary_tables
from harness.results import RunStore, load_run_info, new_run_id, resume_store
from harness.runner import interrupt_guard
from harness.safe_yaml import read_yaml_text
from harness.suite import Cell, Suite, canonical_json, estimate_seconds, filter_cells, load_suite
from harness.tables import pivot_metric


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dry_run_table(cells: list[Cell], version: str) -> pd.DataFrame:
    """The cells as a table: label, seq_len, batch, the config columns that vary across the cells
    (variant parameters are in the label), the time estimate and the key."""
    rows = pd.DataFrame([c.to_row() for c in cells])
    config = ["workload", "mode", "device", "dtype", "tokens_per_batch", *dict.fromkeys(k for c in cells for k in c.model)]
    varying = [c for c in config if c in rows and rows[c].astype(str).nunique() > 1]
    table = rows[["variant_label", "seq_len", "batch", *varying]].copy()
    table["estimate_s"] = [round(estimate_seconds(c), 1) for c in cells]
    table["key"] = [c.key(version) for c in cells]
    return table


def _print_summary(rows: pd.DataFrame, suite: str, path: Path) -> None:
    """Pivot tables of time and memory, the cells that did not finish ok, and status counts."""
    print(f"\nmedian time per call (ms), {suite}:")
    print(pivot_metric(rows, "time_ms_median").to_string())
    print("\npeak memory (MiB):")
    print(pivot_metric(rows, "peak_mem_mib").to_string())
    problems = rows[~rows["status"].isin(["ok", "skipped"])]
    if len(problems):
        print("\nnot ok:")
        for _, row in problems.iterrows():
            first_line = str(row.get("message") or "").strip().splitlines()
            reason = first_line[0][:200] if first_line else ""
            print(f"  {row['variant_label']} L={row['seq_len']} B={row['batch']}: {row['status']}: {reason}")
    counts = rows["status"].value_counts().to_dict()
    print(f"\n{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"\nresults: {path}")


def open_store(args: argparse.Namespace, suite_name: str, device: str) -> RunStore:
    """The run folder: the existing run named by --resume (a plain run id of this suite under
    --out), else a new one whose id is reserved atomically. Writes nothing else."""
    out = Path(args.out)
    try:
        if args.resume:
            return resume_store(out, suite_name, args.resume)
        return RunStore(out, suite_name, new_run_id(device_slug(device_name(device)), parent=out / suite_name))
    except OSError as error:
        raise UsageError(f"cannot write results under {args.out}: {error}") from None


def record_start(args: argparse.Namespace, store: RunStore, run_info: dict, environment: Callable[[], dict]) -> None:
    """Under the run's lock: a new run's run.json (`run_info` plus suite text, command, start and
    `environment()`), or a resumed run's `resumes` entry with `run_info`'s planned cells.
    Unreadable cell files are named."""
    if args.resume:
        resumes = load_run_info(store.path).get("resumes", [])
        planned = {k: v for k, v in run_info.items() if k in ("cell_keys", "cell_labels")}
        store.update_run_info(
            resumes=[*resumes, {"at": _now(), "code_version": run_info["code_version"], "command": command_line(args)}], **planned
        )
        for file in store.corrupt_cells():
            print(f"warning: {file}: unreadable cell file; that cell is measured again", file=sys.stderr)
        return
    store.write_run_info(
        {
            "suite": store.suite,
            "suite_path": str(args.suite),
            "suite_text": read_yaml_text(args.suite, "suite file"),
            **run_info,
            "command": command_line(args),
            "started_at": _now(),
            "environment": environment(),
        }
    )


def planned_cells(cells: list[Cell], version: str) -> dict:
    """run.json fields listing the cells a run plans (what `harness status` counts as pending)."""
    keys = [c.key(version) for c in cells]
    return {"cell_keys": keys, "cell_labels": {k: f"{c.label} L={c.seq_len} B={c.batch}" for k, c in zip(keys, cells)}}


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
        elif not argument.startswith("--resume=") and argument not in ("--dry-run", "--report"):
            kept.append(argument)
    return "python -m harness " + shlex.join([*kept, "--resume", run_id])


def main(args: argparse.Namespace) -> int:
    """`harness run SUITE`: a benchmark suite, or a quality (training) suite (`run_quality`)."""
    if is_quality_suite(args.suite):  # `kind: quality` / a `train:` block: training suites (harness.quality)
        return run_quality(args)
    suite = load_suite(args.suite, device=args.device)
    cells = suite.cells()
    if args.threads is not None:
        cells = [dataclasses.replace(c, measure={**c.measure, "threads": args.threads}) for c in cells]
    if args.filter:
        cells = filter_cells(cells, args.filter)
    if not cells:
        raise UsageError(f"{args.suite}: no cells to run (after --filter {args.filter!r})" if args.filter else f"{args.suite}: no cells")
    version = code_version(REPO_ROOT)
    if args.dry_run:
        table = _dry_run_table(cells, version)
        print(table.to_string(index=False))
        print(f"{len(cells)} cells on {suite.device}; rough estimate {table['estimate_s'].sum() / 60:.1f} min")
        return 0
    if suite.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"{args.suite}: device {suite.device!r}, but CUDA is not available here (try --device cpu)")

    from harness.executors import ExecutorError, run_with_executor
    from harness.runner import RunOptions, interrupt_guard

    if args.in_process and args.executor != "local":
        raise UsageError(f"--in-process runs cells one at a time in this process: not with --executor {args.executor}")
    store = open_store(args, suite.name, suite.device)
    options = RunOptions(code_version=version, run_id=store.path.name, in_process=args.in_process)
    with store.lock("harness run"), interrupt_guard():
        record_start(
            args,
            store,
            {
                "description": suite.description,
                "code_version": version,
                "n_cells": len(cells),
                **planned_cells(cells, version),
                "executor": args.executor,
            },
            environment=lambda: capture_environment(suite.device),
        )
        try:
            finished = store.finished_keys()
            done = sum(c.key(version) in finished for c in cells)
            if args.resume:
                print(f"resuming {store.path}: {done} of {len(cells)} cells already done with code version {version}")
            print(
                f"running {len(cells) - done} of {len(cells)} cells of suite {suite.name!r} on {suite.device} "
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
                print(f"\ninterrupted; finished cells are saved. Continue with: {resume_command(args, store.path.name)}", file=sys.stderr)
            return 130
        store.rebuild()  # also when nothing ran: a missing or unreadable results.parquet is written anew
        store.update_run_info(finished_at=_now())
    if not new_rows:
        print("nothing to run: every cell is already finished")
    _print_summary(pd.DataFrame(store.rows()), suite.name, store.path)
    if args.report:
        from harness.report import render_report

        report = render_report([store.path], out=None, root=args.out)
        print(f"report: {report}")
    if new_rows and all(row["status"] == "error" for row in new_rows):
        print("error: every cell failed with an error (see the messages above); nothing was measured", file=sys.stderr)
        return 1
    return 0


def run_quality(args: argparse.Namespace) -> int:
    """`python -m harness run <quality suite>`: the same options as for benchmark suites
    (--device, --dry-run, --filter, --resume, --out, --in-process, --threads, --report). Training
    cells run one at a time: another --executor is refused rather than ignored."""
    if args.executor != "local" or args.workers is not None:
        raise UsageError(
            f"{args.suite}: a quality suite runs its training cells one at a time here; "
            f"--executor {args.executor}{' --workers' if args.workers is not None else ''} is for benchmark suites"
        )
    suite = load_quality_suite(args.suite, device=args.device)
    cells = suite.cells()
    if args.threads is not None:
        cells = [dataclasses.replace(c, train={**c.train, "threads": args.threads}) for c in cells]
    if args.filter:
        cells = filter_cells(cells, args.filter)  # type: ignore[arg-type]
    if not cells:
        raise UsageError(f"{args.suite}: no training cells" + (f" after --filter {args.filter!r}" if args.filter else ""))
    for task in {canonical_json(c.task): c.task for c in cells}.values():
        try:
            check_files(task)
        except DataError as error:
            if not args.dry_run:
                raise UsageError(f"{args.suite}: task {task['name']!r}: {error}") from None
            print(f"warning: {error}", file=sys.stderr)
    version = code_version(REPO_ROOT)
    if args.dry_run:
        frame = pd.DataFrame(
            [
                {**c.to_row(), "eval_variants": len(c.eval_variants), "estimate_s": estimate_training_seconds(c), "key": c.key(version)}
                for c in cells
            ]
        )
        columns = [
            c
            for c in (
                "train_variant",
                "task",
                "seq_len",
                "n_layers",
                "residual",
                "d_model",
                "seed",
                "train_steps",
                "batch_size",
                "eval_variants",
                "estimate_s",
                "key",
            )
            if c in frame
        ]
        print(frame[columns].to_string(index=False))
        print(f"{len(cells)} training cells on {suite.device}; rough estimate {frame['estimate_s'].sum() / 60:.1f} min")
        return 0
    store = open_store(args, suite.name, suite.device)
    with store.lock("harness run"), interrupt_guard():
        record_start(
            args,
            store,
            {"kind": "quality", "description": suite.description, "code_version": version, "n_cells": len(cells)},
            environment=lambda: capture_environment(suite.device),
        )
        began = time.monotonic()
        try:
            if args.resume:
                print(f"resuming {store.path}")
            print(f"training {len(cells)} cells of quality suite {suite.name!r} on {suite.device} -> {store.path}", flush=True)
            run_quality_cells(cells, store, version, in_process=args.in_process)
        except KeyboardInterrupt:
            store.update_run_info(interrupted_at=_now())
            print(
                f"\ninterrupted; finished rows and checkpoints are saved. Continue with: {resume_command(args, store.path.name)}",
                file=sys.stderr,
            )
            return 130
        wall = time.monotonic() - began
        store.rebuild()  # also when nothing ran: a missing or unreadable results.parquet is written anew
        store.update_run_info(finished_at=_now(), wall_s=round(wall, 1))
    rows = store.rows()
    for title, table in summary_tables(rows):
        print(f"\n{title}:\n{table if isinstance(table, str) else table.to_string()}")
    statuses = pd.Series([r.get("status") for r in rows if r.get("row_type") in ("eval", "error")]).value_counts().to_dict()
    print(
        f"\n{len(cells)} training cells in {wall / 60:.1f} min; eval rows: "
        + ", ".join(f"{n} {s}" for s, n in statuses.items())
        + f"\nresults: {store.path}"
    )
    if args.report:
        from harness.report import render_report

        print(f"report: {render_report([store.path], out=None, root=args.out)}")
    return 0
