"""`harness env`: the environment captured with every run (harness.environment)."""

from __future__ import annotations

import argparse

from harness.environment import capture_environment, format_environment
from harness.suites.common import resolve_device


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    print(format_environment(capture_environment(resolve_device(args.device))))
    return 0
