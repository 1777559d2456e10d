"""`harness export RUN --to csv|tensorboard|mlflow [--dest PATH]`: a stored run in the tools researchers use (harness.export)."""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    from harness.export import export_run

    where = export_run(args.run, args.to, dest=args.dest, root=args.root, tracking_uri=args.tracking_uri)
    print(f"export ({args.to}): {where}")
    return 0
