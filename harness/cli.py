"""Command line: `python -m harness run|status|list|env|report|profile ...` (also installed as `harness`).

Exit status: 0 when the command did its job (cells that ran out of memory, timed out or crashed
are results, not failures), 1 when a run measured nothing because every cell it ran failed with
an error, 2 for unusable input (a bad suite, a missing results folder), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from harness.environment import capture_environment, code_version, device_name, device_slug, format_environment
from harness.results import CorruptCellWarning, ResultsError, RunStore, load_run_info, new_run_id, open_run
from harness.safe_yaml import YAMLInputError, read_yaml_text
from harness.suite import Cell, Suite, SuiteError, estimate_seconds, filter_cells, load_suite
from harness.tables import pivot_metric

REPO_ROOT = Path(__file__).resolve().parent.parent


class UsageError(Exception):
    """Bad input from the command line: printed as one clear message, exit status 2."""


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
            print(f"  {row['variant_label']} L={row['seq_len']} B={row['batch']}: {row['status']}: {first_line[0][:200] if first_line else ''}")
    counts = rows["status"].value_counts().to_dict()
    print(f"\n{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"\nresults: {path}")


def open_store(args: argparse.Namespace, suite_name: str, device: str) -> RunStore:
    """The run folder: the existing run named by --resume (a plain run id of this suite under
    --out), else a new one whose id is reserved atomically. Writes nothing else."""
    out = Path(args.out)
    try:
        if args.resume:
            return open_run(out, suite_name, args.resume)
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
        store.update_run_info(resumes=[*resumes, {"at": _now(), "code_version": run_info["code_version"],
                                                  "command": command_line(args)}], **planned)
        for file in store.corrupt_cells():
            print(f"warning: {file}: unreadable cell file; that cell is measured again", file=sys.stderr)
        return
    store.write_run_info({"suite": store.suite, "suite_path": str(args.suite),
                          "suite_text": read_yaml_text(args.suite, "suite file"), **run_info,
                          "command": command_line(args), "started_at": _now(), "environment": environment()})


def _planned_cells(cells: list[Cell], version: str) -> dict:
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


def command_run(args: argparse.Namespace) -> int:
    from harness.quality import is_quality_suite

    if is_quality_suite(args.suite):  # `kind: quality` / a `train:` block: training suites (harness.quality)
        from harness.quality import command_run_quality

        return command_run_quality(args)
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
        record_start(args, store, {"description": suite.description, "code_version": version, "n_cells": len(cells),
                                   **_planned_cells(cells, version), "executor": args.executor},
                     environment=lambda: capture_environment(suite.device))
        try:
            finished = store.finished_keys()
            done = sum(c.key(version) in finished for c in cells)
            if args.resume:
                print(f"resuming {store.path}: {done} of {len(cells)} cells already done with code version {version}")
            print(f"running {len(cells) - done} of {len(cells)} cells of suite {suite.name!r} on {suite.device} "
                  f"({args.executor}) -> {store.path}", flush=True)
            new_rows = run_with_executor(args.executor, cells, store, options, device=suite.device, workers=args.workers,
                                         slurm=_slurm_settings(args, suite), cluster=args.submitit_cluster)
        except ExecutorError as error:
            raise UsageError(str(error)) from None
        except KeyboardInterrupt:
            store.update_run_info(interrupted_at=_now())
            if args.executor == "submitit":  # the jobs go on: a resume now would measure their cells twice
                print(f"\ninterrupted; the jobs keep running (see above). Once they have ended, continue with: "
                      f"{resume_command(args, store.path.name)}", file=sys.stderr)
            else:
                print(f"\ninterrupted; finished cells are saved. Continue with: {resume_command(args, store.path.name)}",
                      file=sys.stderr)
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


def command_status(args: argparse.Namespace) -> int:
    from harness.results import _resolve
    from harness.status import format_status, run_status

    path, kind, _, _ = _resolve(args.run, Path(args.out))
    if kind != "run" or not (path / "run.json").is_file():
        raise UsageError(f"{args.run}: not a run folder with a run.json")
    print(format_status(run_status(path)))
    return 0


def command_list(args: argparse.Namespace) -> int:
    import variants

    for name in variants.available():
        variant = variants.spec(name)
        print(f"{name}  [{variant.kind}]  {variant.doc}")
        for parameter, (type_name, default) in variants.describe(name).items():
            print(f"    {parameter}: {type_name} = {default!r}")
    return 0


def command_env(args: argparse.Namespace) -> int:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(format_environment(capture_environment(device)))
    return 0


def command_check(args: argparse.Namespace) -> int:
    from harness.check import FORMATS, load_run_data, rules_for, run_check

    if args.targets:
        from harness.targets import evaluate_targets, format_targets

        run = load_run_data(args.run, args.root)
        rules, source = rules_for(run, args.checks)
        table = evaluate_targets(run.frame, rules.targets)
        print(format_targets(table, source))
        return 0 if bool(table["met"].all()) else 1
    if args.baseline is None:
        raise UsageError("check needs --baseline BASELINE (regressions) or --targets (the suite's absolute targets)")
    report = run_check(args.run, args.baseline, root=args.root, any_device=args.any_device, checks_file=args.checks)
    print(FORMATS[args.format](report))
    return report.exit_code  # 1 on a regression


def command_baseline(args: argparse.Namespace) -> int:
    from harness.check import promote_baseline

    print(f"baseline {args.name!r}: {promote_baseline(args.run, args.name, root=args.root, force=args.force)}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from harness.report import render_report

    out = Path(args.out) if args.out else None
    print(f"report: {render_report(args.results, out=out, root=args.root)}")
    return 0


def command_compare(args: argparse.Namespace) -> int:
    from harness.report import render_compare

    out = Path(args.out) if args.out else None
    print(f"comparison: {render_compare(args.run_a, args.run_b, out=out, root=args.root)}")
    return 0


def command_profile(args: argparse.Namespace) -> int:
    import torch

    from harness.profile import profile_cell

    suite = load_suite(args.suite, device=args.device)
    cells = filter_cells(suite.cells(), args.filter) if args.filter else suite.cells()
    if not cells:
        raise UsageError(f"no cell of {args.suite} matches --filter {args.filter!r}")
    if len(cells) > args.max_cells:
        raise UsageError(f"{len(cells)} cells match; narrow --filter (or raise --max-cells {args.max_cells})")
    if args.threads:
        torch.set_num_threads(args.threads)
    for cell in cells:
        print(profile_cell(cell, torch.device(suite.device), steps=args.steps, top=args.top))
    return 0


def command_selfcheck(args: argparse.Namespace) -> int:
    from harness.selfcheck import SelfcheckError, plan_checks, run_selfcheck, select_checks

    try:
        if args.list:
            print("\n".join(check.name for check in select_checks(plan_checks(args.quick), args.only)))
            return 0
        return run_selfcheck(args.device, quick=args.quick, only=args.only, out=args.out).exit_code
    except SelfcheckError as error:
        raise UsageError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="Benchmark and ablation harness for efficient attention.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a suite: one isolated process per cell, results under --out")
    run.add_argument("suite", help="suite YAML file, e.g. suites/seq_length.yaml")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="override the suite's device")
    run.add_argument("--dry-run", action="store_true", help="list the cells and a rough time estimate, run nothing")
    run.add_argument("--filter", help="pandas query over cell columns, e.g. \"variant == 'lsh' and seq_len <= 4096\"")
    run.add_argument("--resume", metavar="RUN_ID", help="continue a run: only cells not finished with this code version")
    run.add_argument("--out", default="results", help="results root (default: results/ in the working directory)")
    run.add_argument("--threads", type=int, choices=range(1, 1025), metavar="N", help="CPU threads per cell (overrides the suite's measure.threads)")
    run.add_argument("--in-process", action="store_true", help="run cells in this process (debugging; no isolation)")
    run.add_argument("--report", action="store_true", help="render the report of this run when it finishes")
    run.add_argument("--executor", choices=["local", "pool", "submitit"], default="local",
                     help="local: one cell at a time (default); pool: one worker per GPU or --workers on CPU; "
                     "submitit: a Slurm job array (harness.executors)")
    run.add_argument("--workers", type=int, choices=range(1, 1025), metavar="N",
                     help="pool executor: worker slots (CPU default 1, threads split among them; CUDA: at most one per GPU)")
    run.add_argument("--slurm-partition", help="submitit: Slurm partition (overrides the suite's slurm.partition)")
    run.add_argument("--slurm-time-min", type=int, metavar="MIN", help="submitit: minutes per job before it is requeued")
    run.add_argument("--slurm-gpus-per-node", type=int, metavar="N", help="submitit: GPUs per job (default 1 on CUDA)")
    run.add_argument("--slurm-array-parallelism", type=int, metavar="N", help="submitit: array tasks running at once")
    run.add_argument("--submitit-cluster", choices=["slurm", "local"], default=None,
                     help="submitit: force the cluster (default: Slurm when available; local runs jobs here, for testing)")
    run.set_defaults(handler=command_run)

    status = commands.add_parser("status", help="done / running / failed / pending cells of a run (any executor)")
    status.add_argument("run", help="run folder, run id or suite folder (its latest run)")
    status.add_argument("--out", default="results", help="results root (default: results/ in the working directory)")
    status.set_defaults(handler=command_status)

    listing = commands.add_parser("list", help="registered variants and their parameters")
    listing.set_defaults(handler=command_list)

    env = commands.add_parser("env", help="print the environment capture stored with every run")
    env.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    env.set_defaults(handler=command_env)

    check = commands.add_parser("check", help="compare a run with a baseline; exit 1 on a regression, 2 on unusable input")
    check.add_argument("run", help="run folder, suite folder (its latest run), run id or results.parquet")
    check.add_argument("--baseline", help="baseline folder, or a name under <root>/baselines/<device slug>/")
    check.add_argument("--targets", action="store_true", help="instead of a baseline: the checks' absolute `targets:` within the run (exit 1 if one is missed)")
    check.add_argument("--any-device", action="store_true", help="compare even when the device names differ (memory, ratio checks)")
    check.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    check.add_argument("--checks", metavar="FILE", help="YAML checks block to use instead of the suite's `checks:`")
    check.add_argument("--root", default="results", help="results root (default: results/ in the working directory)")
    check.set_defaults(handler=command_check)

    baseline = commands.add_parser("baseline", help="promote a run to results/baselines/<device slug>/NAME/")
    baseline.add_argument("run", help="run folder, suite folder (its latest run) or run id")
    baseline.add_argument("--name", required=True, help="baseline name, e.g. the suite name")
    baseline.add_argument("--force", action="store_true", help="replace an existing baseline / promote an unfinished run")
    baseline.add_argument("--root", default="results", help="results root (default: results/ in the working directory)")
    baseline.set_defaults(handler=command_baseline)

    report = commands.add_parser("report", help="render figures, report.md and index.html from stored results (runs nothing)")
    report.add_argument("results", nargs="*", help="run folders, suite folders, run ids or results.parquet files "
                        "(default: the latest run of every suite under --root)")
    report.add_argument("--out", help="output folder (default: reports/<suite>/<run_id>/)")
    report.add_argument("--root", default="results", help="results root (default: results/ in the working directory)")
    report.set_defaults(handler=command_report)

    compare = commands.add_parser("compare", help="time ratio B/A per matched cell of two runs, marking differences within noise")
    compare.add_argument("run_a", help="run A (the reference): run folder, suite folder, run id or results.parquet")
    compare.add_argument("run_b", help="run B")
    compare.add_argument("--out", help="output folder (default: reports/compare/<A>-vs-<B>/)")
    compare.add_argument("--root", default="results", help="results root (default: results/ in the working directory)")
    compare.set_defaults(handler=command_compare)

    prof = commands.add_parser("profile", help="torch.profiler table of selected cells, run in this process (diagnostic)")
    prof.add_argument("suite", help="suite YAML file")
    prof.add_argument("--filter", help="pandas query over cell columns selecting the cells to profile")
    prof.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="override the suite's device")
    prof.add_argument("--steps", type=int, default=1, choices=range(1, 1001), metavar="N", help="profiled calls (default 1)")
    prof.add_argument("--top", type=int, default=25, choices=range(1, 1001), metavar="N", help="table rows (default 25)")
    prof.add_argument("--threads", type=int, choices=range(1, 1025), metavar="N", help="CPU threads")
    prof.add_argument("--max-cells", type=int, default=4, help="refuse to profile more cells than this (default 4)")
    prof.set_defaults(handler=command_profile)

    selfcheck = commands.add_parser("selfcheck", help="exercise every device path against float64 CPU references "
                                    "(PASS/FAIL/SKIP per check); exit 1 on a FAIL")
    selfcheck.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                           help="device under test (default: cuda when available); cuda without CUDA is an error (exit 2)")
    selfcheck.add_argument("--quick", action="store_true", help="leave out the long LSH cases, fewer repeats (CPU CI)")
    selfcheck.add_argument("--only", action="append", metavar="GLOB", help="run only checks matching GLOB, e.g. 'lsh/*' (repeatable)")
    selfcheck.add_argument("--list", action="store_true", help="list the checks that would run, run nothing")
    selfcheck.add_argument("--out", default=str(Path("results") / "_scratch" / "selfcheck"),
                           help="folder of the JSON summary selfcheck.json (default: results/_scratch/selfcheck/)")
    selfcheck.set_defaults(handler=command_selfcheck)
    return parser


def _print_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: Any = None, line: str | None = None) -> None:
    """Our own warnings (an unreadable cell file) as one `warning:` line on stderr; others as usual."""
    if issubclass(category, CorruptCellWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _print_warning
    try:
        return args.handler(args)
    except (SuiteError, ResultsError, UsageError, YAMLInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `harness list | head`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
