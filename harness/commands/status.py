"""`harness status RUN`: done / running / failed / corrupt / pending cells of a run (harness.status)."""

from __future__ import annotations

import argparse

from harness.commands import UsageError
from harness.status import format_status, run_status
from harness.store.reader import read_run


def main(args: argparse.Namespace) -> int:
    """The handler of this subcommand (module docstring); returns the exit status."""
    run = read_run(args.run, args.out, load_rows=False)  # the cells are read by run_status itself
    if run.source != run.path or not run.info:
        raise UsageError(f"{args.run}: not a run folder with a run.json")
    print(format_status(run_status(run.path)))
    return 0
