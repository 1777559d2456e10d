"""`harness env`: the environment captured with every run (harness.environment)."""

from __future__ import annotations

import argparse

from harness.environment import capture_environment, format_environment


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(format_environment(capture_environment(device)))
    return 0
