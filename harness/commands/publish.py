"""`harness publish [--out DIR] [--site SITE_DIR]`: a static site of every run under the results root
(harness.report.site): index of suites and devices, history pages, run reports, comparisons with baselines."""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    from harness.report.site import publish

    site = publish(args.out, args.site)
    print(f"site: {site}/index.html")
    return 0
