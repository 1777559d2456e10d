"""`harness selfcheck`: every device code path against float64 CPU references (harness.selfcheck)."""

from __future__ import annotations

import argparse

from harness.commands import UsageError


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    from harness.selfcheck import SelfcheckError, plan_checks, run_selfcheck, select_checks

    try:
        if args.list:
            print("\n".join(check.name for check in select_checks(plan_checks(args.quick), args.only)))
            return 0
        return run_selfcheck(args.device, quick=args.quick, only=args.only, out=args.out).exit_code
    except SelfcheckError as error:
        raise UsageError(str(error)) from None
