"""`harness compare RUN_A RUN_B`: time ratio B/A per paired cell, with its noise verdict (harness.report.compare_report)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    from harness.report.compare_report import render_compare

    out = Path(args.out) if args.out else None
    print(f"comparison: {render_compare(args.run_a, args.run_b, out=out, root=args.root, echo=print)}")
    return 0
