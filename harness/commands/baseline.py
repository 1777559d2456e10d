"""`harness baseline RUN --name NAME`: promote a run to results/baselines/<device slug>/NAME/ (harness.check.baseline)."""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    from harness.check.baseline import promote_baseline

    print(f"baseline {args.name!r}: {promote_baseline(args.run, args.name, root=args.root, force=args.force)}")
    return 0
