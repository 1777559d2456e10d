"""`harness runs [--out DIR] [--suite NAME]`: one line per stored run (harness.analysis.catalog)."""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from harness.report.document import Table, to_text


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    from harness.analysis.catalog import find_runs
    from harness.report.folders import shown_path

    problems: list[str] = []
    entries = find_runs(args.out, args.suite, problems)
    for problem in problems:
        print(f"warning: not listed: {problem}", file=sys.stderr)
    if not entries:
        print(f"no runs under {args.out}" + (f" of suite {args.suite!r}" if args.suite else ""))
        return 0
    rows = [
        {
            "suite": e.suite,  # not a column: the table's heading
            "run": shown_path(e.run.path) if e.baseline else e.run.run_id,
            "device": e.run.device_name,  # not a column: the table's heading
            "code version": e.run.code_version + (f" ({e.commit_date})" if e.commit_date else ""),
            "started": e.started[:19],
            "ok": e.ok,
            "failed": e.failed,
            "contended": e.contended,  # not a column: the count of contended cells
            "unfinished": e.unfinished,
            "baseline": "baseline" if e.baseline else "",
        }
        for e in entries
    ]
    print(to_text([Table(pd.DataFrame(rows), index=False, text="columns")]))
    return 0
