"""`harness profile SUITE --filter EXPR`: torch.profiler tables of a few cells, in this process (harness.profile)."""

from __future__ import annotations

import argparse

from harness.commands import UsageError
from harness.suites import filter_cells
from harness.suites.resolved import config_yaml, load_with_overrides


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    import torch

    from harness.profile import profile_cell

    suite, overrides = load_with_overrides(args.suite, args.set, device=args.device)
    if args.print_config:
        print(config_yaml(suite, overrides), end="")
        return 0
    if suite.kind != "benchmark":
        raise UsageError(f"{args.suite}: profile runs the cells of benchmark suites; this is a {suite.kind} suite")
    cells = filter_cells(suite.cells(), args.filter) if args.filter else suite.cells()
    if not cells:
        raise UsageError(f"no cell of {args.suite} matches --filter {args.filter!r}")
    if len(cells) > args.max_cells:
        raise UsageError(f"{len(cells)} cells match; narrow --filter (or raise --max-cells {args.max_cells})")
    if args.threads:
        torch.set_num_threads(args.threads)
    for cell in cells:
        print(profile_cell(cell, torch.device(suite.device), steps=args.steps, top=args.top))
    return 0
