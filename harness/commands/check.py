"""`harness check RUN --baseline B | --targets`: regressions against a baseline (harness.check.regression),
or the suite's absolute targets (harness.analysis.targets)."""

from __future__ import annotations

import argparse

from harness.commands import UsageError


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    from harness.check.formats import FORMATS
    from harness.check.regression import load_run_data, rules_for, run_check

    if args.targets:
        from harness.analysis.targets import evaluate_targets, targets_pass
        from harness.check.targets import format_targets

        run = load_run_data(args.run, args.root)
        rules, source = rules_for(run, args.checks)
        table = evaluate_targets(run.rows, rules.targets)
        print(format_targets(table, source))
        return 0 if targets_pass(table) else 1
    if args.baseline is None:
        raise UsageError("check needs --baseline BASELINE (regressions) or --targets (the suite's absolute targets)")
    report = run_check(args.run, args.baseline, root=args.root, any_device=args.any_device, checks_file=args.checks)
    print(FORMATS[args.format](report))
    return report.exit_code  # 1 on a regression
