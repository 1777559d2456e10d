"""Command line: `python -m harness run|list|env|report ...` (also installed as `harness`).

Exit status: 0 when the command did its job (cells that ran out of memory are results, not
failures), 2 for unusable input (a bad suite, a missing results folder), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from harness.environment import capture_environment, code_version, device_name, device_slug, format_environment
from harness.results import ResultsError, RunStore, new_run_id
from harness.suite import SuiteError, estimate_seconds, filter_cells, load_suite
from harness.tables import pivot_metric

REPO_ROOT = Path(__file__).resolve().parent.parent


class UsageError(Exception):
    """Bad input from the command line: printed as one clear message, exit status 2."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_run(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite, device=args.device)
    cells = suite.cells()
    if args.filter:
        cells = filter_cells(cells, args.filter)
    if not cells:
        raise UsageError(f"{args.suite}: no cells to run (after --filter {args.filter!r})" if args.filter else f"{args.suite}: no cells")
    version = code_version(REPO_ROOT)
    if args.dry_run:
        rows = pd.DataFrame([{**c.to_row(), "key": c.key(version), "estimate_s": estimate_seconds(c)} for c in cells])
        columns = [c for c in ("variant_label", "seq_len", "batch", "n_layers", "residual", "d_ff", "ffn_chunks", "estimate_s", "key") if c in rows]
        print(rows[columns].to_string(index=False))
        print(f"{len(cells)} cells on {suite.device}; rough estimate {rows['estimate_s'].sum() / 60:.1f} min")
        return 0

    out = Path(args.out)
    if args.resume:
        run_folder = out / suite.name / args.resume
        if not (run_folder / "run.json").exists():
            raise UsageError(f"--resume {args.resume}: no run at {run_folder} (expected {run_folder / 'run.json'})")
        store = RunStore(out, suite.name, args.resume)
        finished = store.finished_keys()
        print(f"resuming {store.path}: {sum(c.key(version) in finished for c in cells)} of {len(cells)} cells already done")
    else:
        store = RunStore(out, suite.name, new_run_id(device_slug(device_name(suite.device)), parent=out / suite.name))
        finished = set()
        store.write_run_info(
            {
                "suite": suite.name,
                "suite_path": str(args.suite),
                "suite_text": Path(args.suite).read_text(),
                "description": suite.description,
                "command": "python -m harness " + shlex.join(sys.argv[1:]),
                "code_version": version,
                "n_cells": len(cells),
                "started_at": _now(),
                "environment": capture_environment(suite.device),
            }
        )
    print(f"running {len(cells)} cells of suite {suite.name!r} on {suite.device} -> {store.path}", flush=True)
    from harness.runner import RunOptions, interrupt_guard, run_cells

    interrupt_guard()
    options = RunOptions(code_version=version, run_id=store.path.name, in_process=args.in_process)
    try:
        run_cells(cells, store, options, finished=finished)
    except KeyboardInterrupt:
        store.update_run_info(interrupted_at=_now())
        print(f"\ninterrupted; finished cells are saved. Continue with: python -m harness run {args.suite} --resume {store.path.name}", file=sys.stderr)
        return 130
    store.update_run_info(finished_at=_now())
    rows = pd.DataFrame(store.rows())
    print(f"\nmedian time per call (ms), {suite.name}:")
    print(pivot_metric(rows, "time_ms_median").to_string())
    print("\npeak memory (MiB):")
    print(pivot_metric(rows, "peak_mem_mib").to_string())
    counts = rows["status"].value_counts().to_dict()
    print(f"\n{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"\nresults: {store.path}")
    if args.report:
        from harness.report import render_report

        report = render_report([store.path], out=None)
        print(f"report: {report}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="Benchmark and ablation harness for efficient attention.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a suite: one isolated process per cell, results under --out")
    run.add_argument("suite", help="suite YAML file, e.g. suites/seq_length.yaml")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="override the suite's device")
    run.add_argument("--dry-run", action="store_true", help="list the cells and a rough time estimate, run nothing")
    run.add_argument("--filter", help="pandas query over cell columns, e.g. \"variant == 'lsh' and seq_len <= 4096\"")
    run.add_argument("--resume", metavar="RUN_ID", help="continue a run: only cells not finished with this code version")
    run.add_argument("--out", default=str(REPO_ROOT / "results"), help="results root (default: results/)")
    run.add_argument("--in-process", action="store_true", help="run cells in this process (debugging; no isolation)")
    run.add_argument("--report", action="store_true", help="render the report of this run when it finishes")
    run.set_defaults(handler=command_run)

    listing = commands.add_parser("list", help="registered variants and their parameters")
    listing.set_defaults(handler=command_list)

    env = commands.add_parser("env", help="print the environment capture stored with every run")
    env.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    env.set_defaults(handler=command_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (SuiteError, ResultsError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
