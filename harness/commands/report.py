"""`harness report [RESULTS ...]`: figures, report.md and index.html from stored runs (harness.report.run_report)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    from harness.report.run_report import render_report

    out = Path(args.out) if args.out else None
    print(f"report: {render_report(args.results, out=out, root=args.root)}")
    return 0
