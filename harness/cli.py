"""Command line: the parser of `python -m harness run|status|list|env|report|compare|check|baseline|profile|selfcheck|export`
(also installed as `harness`); each subcommand's handler is `harness.commands.<name>.main`.

Exit status: 0 when the command did its job (cells that ran out of memory, timed out or crashed
are results, not failures), 1 when a run measured nothing because every cell it ran failed with
an error, 2 for unusable input (a bad suite, a missing results folder), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from harness.analysis.drift import CALIBRATION_MATMUL, CALIBRATIONS
from harness.commands import UsageError
from harness.commands import baseline as baseline_command
from harness.commands import check as check_command
from harness.commands import compare as compare_command
from harness.commands import env as env_command
from harness.commands import export as export_command
from harness.commands import history as history_command
from harness.commands import list as list_command
from harness.commands import profile as profile_command
from harness.commands import publish as publish_command
from harness.commands import report as report_command
from harness.commands import run as run_command
from harness.commands import runs as runs_command
from harness.commands import selfcheck as selfcheck_command
from harness.commands import status as status_command
from harness.export import EXPORT_FORMATS, ExportError
from harness.overrides import OverrideError
from harness.safe_io import InputFileError, terminal_text
from harness.safe_yaml import YAMLInputError
from harness.store.files import CorruptCellWarning, ResultsError
from harness.suites import SuiteError
from variants.registry import PluginError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="Benchmark and ablation harness for efficient attention.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a suite: one isolated process per cell, results under --out")
    run.add_argument("suite", help="suite YAML file, e.g. suites/seq_length.yaml")  # not a column: the argument
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="override the suite's device")
    run.add_argument("--dry-run", action="store_true", help="list the cells and a rough time estimate, run nothing")
    run.add_argument(
        "--filter",
        metavar="EXPR",
        help="run only the cells whose columns satisfy EXPR, in the safe selection language of harness/expressions.py "
        "(comparisons, in [...], and/or/not, arithmetic), e.g. \"variant == 'lsh' and seq_len <= 4096\"",
    )
    run.add_argument("--resume", metavar="RUN_ID", help="continue a run: only cells not finished with this code version")
    run.add_argument("--out", default="results", help="results root (default: results/ in the working directory)")
    run.add_argument(
        "--threads", type=int, choices=range(1, 1025), metavar="N", help="CPU threads per cell (overrides the suite's measure.threads)"
    )
    run.add_argument("--in-process", action="store_true", help="run cells in this process (debugging; no isolation)")
    run.add_argument("--report", action="store_true", help="render the report of this run when it finishes")
    run.add_argument(
        "--executor",
        choices=["local", "pool", "submitit"],
        default="local",
        help="local: one cell at a time (default); pool: one worker per GPU or --workers on CPU; "
        "submitit: a Slurm job array (harness.executors)",
    )
    run.add_argument(
        "--workers",
        type=int,
        choices=range(1, 1025),
        metavar="N",
        help="pool executor: worker slots (CPU default 1, threads split among them; CUDA: at most one per GPU)",
    )
    run.add_argument("--slurm-partition", help="submitit: Slurm partition (overrides the suite's slurm.partition)")
    run.add_argument("--slurm-time-min", type=int, metavar="MIN", help="submitit: minutes per job before it is requeued")
    run.add_argument("--slurm-gpus-per-node", type=int, metavar="N", help="submitit: GPUs per job (default 1 on CUDA)")
    run.add_argument("--slurm-array-parallelism", type=int, metavar="N", help="submitit: array tasks running at once")
    run.add_argument(
        "--submitit-cluster",
        choices=["slurm", "local"],
        default=None,
        help="submitit: force the cluster (default: Slurm when available; local runs jobs here, for testing)",
    )
    add_override_options(run)
    run.add_argument(
        "--export",
        action="append",
        choices=EXPORT_FORMATS,
        metavar="FORMAT",
        help=f"export the run when it finishes ({', '.join(EXPORT_FORMATS)}; repeatable; into exports/<format>/, see harness export)",
    )
    run.set_defaults(handler=run_command.main)

    status = commands.add_parser(
        "status",  # not a column: the subcommand
        help="done / running / failed / pending cells of a run (any executor)",
    )
    status.add_argument("run", help="run folder, run id or suite folder (its latest run)")
    status.add_argument("--out", default="results", help="results root (default: results/ in the working directory)")
    status.set_defaults(handler=status_command.main)

    runs = commands.add_parser(
        "runs", help="one line per stored run: suite, run id, device, code version, started, cells ok/failed/contended/unfinished"
    )
    runs.add_argument("--out", default="results", help="results root (default: results/ in the working directory)")
    runs.add_argument("--suite", metavar="NAME", help="only the runs of this suite")
    runs.set_defaults(handler=runs_command.main)

    listing = commands.add_parser("list", help="registered variants and their parameters")
    listing.set_defaults(handler=list_command.main)

    env = commands.add_parser("env", help="print the environment capture stored with every run")
    env.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="the device to describe (default: cuda when available)"
    )
    env.set_defaults(handler=env_command.main)

    check = commands.add_parser(
        "check",
        help="compare a run with a baseline, or check its own targets; exit 1 on a regression or a missed target, 2 on unusable input",
    )
    check.add_argument("run", help="run folder, suite folder (its latest run), run id or results.parquet")
    check.add_argument("--baseline", help="baseline folder, or a name under <root>/baselines/<device slug>/")
    check.add_argument(
        "--targets",
        action="store_true",
        help="instead of a baseline: the checks' absolute `targets:` within the run (exit 1 if one is missed)",
    )
    check.add_argument(
        "--any-device",
        action="store_true",
        help="compare even when the device names differ (meant for memory, ratio and status checks); "
        "a baseline name is then also found under another device's folder",
    )
    check.add_argument("--format", choices=["text", "json", "markdown"], default="text", help="output format (default: text)")
    check.add_argument("--checks", metavar="FILE", help="YAML checks block to use instead of the suite's `checks:`")
    check.add_argument("--root", default="results", help="results root (default: results/ in the working directory)")
    check.set_defaults(handler=check_command.main)

    baseline = commands.add_parser("baseline", help="promote a run to <root>/baselines/<device slug>/NAME/ (root: --root, default results)")
    baseline.add_argument("run", help="run folder, suite folder (its latest run) or run id")
    baseline.add_argument("--name", required=True, help="baseline name, e.g. the suite name")
    baseline.add_argument("--force", action="store_true", help="replace an existing baseline / promote an unfinished run")
    baseline.add_argument("--root", default="results", help="results root (default: results/ in the working directory)")
    baseline.set_defaults(handler=baseline_command.main)

    report = commands.add_parser("report", help="render figures, report.md and index.html from stored results (runs nothing)")
    report.add_argument(
        "results",
        nargs="*",
        help="run folders, suite folders, run ids or results.parquet files (default: the latest run of every suite under --root)",
    )
    report.add_argument("--out", help="output folder (default: reports/<suite>/<run_id>/)")
    report.add_argument("--root", default="results", help="results root (default: results/ in the working directory)")
    report.set_defaults(handler=report_command.main)

    compare = commands.add_parser(
        "compare", help="every run against the first: time ratio per matched cell, 95%% interval, verdict with between-run drift"
    )
    compare.add_argument(
        "runs", nargs="+", metavar="RUN", help="runs A B [C ...], A the reference: run folders, suite folders, run ids or results.parquet"
    )
    compare.add_argument(
        "--calibration",
        choices=CALIBRATIONS,
        default=CALIBRATION_MATMUL,
        help="normalise each run by its median matmul rate (default; when both runs recorded one) or not at all",
    )
    compare.add_argument(
        "--reference",
        metavar="EXPR",
        help="calibrate on these cells instead, declared unchanged (selection language), e.g. \"variant == 'sdpa'\"",
    )
    compare.add_argument("--out", help="output folder (default: reports/compare/<A>-vs-<B>[-vs-<C>...]/)")
    compare.add_argument("--root", default="results", help="results root (default: results/ in the working directory)")
    compare.set_defaults(handler=compare_command.main)

    history = commands.add_parser(
        "history", help="a metric of every configuration across a suite's runs, per device, with step changes between code versions"
    )
    history.add_argument("suite", help="suite name (its folder under --out)")  # not a column: the argument
    history.add_argument("--out", default="results", help="results root (default: results/ in the working directory)")
    history.add_argument("--metric", default="time", help="time (default), memory, bpd, accuracy, or a numeric result column")
    history.add_argument("--filter", metavar="EXPR", help="only the configurations whose columns satisfy EXPR (selection language)")
    history.add_argument("--threshold", type=float, default=0.10, help="smallest relative change a step must have (default 0.10)")
    history.add_argument("--report", metavar="DIR", help="output folder (default: reports/history/<suite>/ beside the results root)")
    history.add_argument("--fail-on-step", action="store_true", help="exit 1 when the latest code version has a step for the worse")
    history.set_defaults(handler=history_command.main)

    publish = commands.add_parser("publish", help="a static site of every run: index, history pages, run reports, baseline comparisons")
    publish.add_argument("--out", default="results", help="results root (default: results/ in the working directory)")
    publish.add_argument("--site", default="site", help="site folder, replaced as a whole (default: site/)")
    publish.set_defaults(handler=publish_command.main)

    prof = commands.add_parser("profile", help="torch.profiler table of selected cells, run in this process (diagnostic)")
    prof.add_argument("suite", help="suite YAML file")  # not a column: the argument
    prof.add_argument(
        "--filter",
        metavar="EXPR",
        help="the cells to profile: those whose columns satisfy EXPR (the selection language of run --filter, "
        "harness/expressions.py), e.g. \"variant == 'lsh' and seq_len == 4096\"",
    )
    prof.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="override the suite's device")
    prof.add_argument("--steps", type=int, default=1, choices=range(1, 1001), metavar="N", help="profiled calls (default 1)")
    prof.add_argument("--top", type=int, default=25, choices=range(1, 1001), metavar="N", help="table rows (default 25)")
    prof.add_argument("--threads", type=int, choices=range(1, 1025), metavar="N", help="CPU threads")
    prof.add_argument("--max-cells", type=int, default=4, help="refuse to profile more cells than this (default 4)")
    add_override_options(prof)
    prof.set_defaults(handler=profile_command.main)

    export = commands.add_parser("export", help="write a stored run to CSV, TensorBoard event files or an MLflow tracking store")
    export.add_argument("run", help="run folder, suite folder (its latest run) or run id")
    export.add_argument(
        "--to", required=True, choices=EXPORT_FORMATS, help="csv: tidy tables; tensorboard: event files; mlflow: a tracking store"
    )
    export.add_argument("--dest", help="output folder (default: exports/<format>/ beside the results root)")
    export.add_argument("--tracking-uri", help="mlflow: the tracking store (default: sqlite:///<dest>/mlflow.db); any MLflow tracking URI")
    export.add_argument("--root", default="results", help="results root (default: results/ in the working directory)")
    export.set_defaults(handler=export_command.main)

    selfcheck = commands.add_parser(
        "selfcheck", help="exercise every device path against float64 CPU references (PASS/FAIL/SKIP per check); exit 1 on a FAIL"
    )
    selfcheck.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="device under test (default: cuda when available); cuda without CUDA is an error (exit 2)",
    )
    selfcheck.add_argument("--quick", action="store_true", help="leave out the long LSH cases, fewer repeats (CPU CI)")
    selfcheck.add_argument("--only", action="append", metavar="GLOB", help="run only checks matching GLOB, e.g. 'lsh/*' (repeatable)")
    selfcheck.add_argument("--list", action="store_true", help="list the checks that would run, run nothing")
    selfcheck.add_argument(
        "--out",
        default=str(Path("results") / "_scratch" / "selfcheck"),
        help="folder of the JSON summary selfcheck.json (default: results/_scratch/selfcheck/)",
    )
    selfcheck.set_defaults(handler=selfcheck_command.main)
    return parser


def add_override_options(parser: argparse.ArgumentParser) -> None:
    """--set PATH=VALUE (repeatable) and --print-config (harness.overrides) on a command that loads a suite."""
    parser.add_argument(
        "--set",
        action="append",
        metavar="PATH=VALUE",
        help="override a suite key (YAML value), e.g. --set model.d_model=512 --set sweep.seq_len=[1024,2048] "
        "--set variants.1.n_hashes=4; applied after the cpu:/cuda: block (repeatable)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved suite (device block, --set applied) as YAML and exit"
    )


def _print_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None
) -> None:
    """Our own warnings (an unreadable cell file) as one `warning:` line on stderr; others as usual."""
    if issubclass(category, CorruptCellWarning):
        print(terminal_text(f"warning: {message}"), file=sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _print_warning
    try:
        return args.handler(args)
    except (SuiteError, ResultsError, UsageError, YAMLInputError, OverrideError, ExportError, InputFileError, PluginError) as error:
        print(terminal_text(f"error: {error}"), file=sys.stderr)  # the message may quote a file's text
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `harness list | head`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
