"""`harness history SUITE`: one metric of every configuration across the suite's runs, per device, with
step changes between consecutive code versions (harness.report.history_report); `--fail-on-step`
exits 1 when the latest code version has a step for the worse."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.commands import UsageError


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    from harness.analysis.history import metric_of
    from harness.report.history_report import load_histories, render_history, summary_lines

    try:
        metric = metric_of(args.metric)
    except ValueError as error:
        raise UsageError(f"--metric: {error}") from None
    if not 0 <= args.threshold < 10:
        raise UsageError(f"--threshold: a relative change between 0 and 10, got {args.threshold}")
    histories = load_histories(args.suite, args.out, metric, args.filter, args.threshold)
    for history in histories:
        for line in summary_lines(history):
            print(line)
    folder = render_history(histories, args.out, Path(args.report) if args.report else None)
    print(f"history: {folder}")
    worse = [s for h in histories for s in h.latest_worse]
    if args.fail_on_step and worse:
        print(f"FAIL: {len(worse)} step(s) for the worse in the latest code version")
        return 1
    return 0
