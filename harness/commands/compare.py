"""`harness compare A B [C ...]`: every run against the first, time ratios with 95% intervals and verdicts that
account for between-run drift (harness.report.compare_report, harness.analysis.comparison)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    from harness.report.compare_report import render_compare
    from harness.safe_io import terminal_text

    out = Path(args.out) if args.out else None

    def echo(text: str) -> None:
        print(terminal_text(text))

    folder = render_compare(*args.runs, out=out, root=args.root, echo=echo, calibration=args.calibration, reference=args.reference)
    print(f"comparison: {folder}")
    return 0
