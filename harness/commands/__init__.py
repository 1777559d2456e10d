"""The subcommands of `python -m harness`, one module each (the parser is harness.cli):

run (benchmark and quality suites), status, list, env, report, compare, check, baseline, profile,
selfcheck, export. Each module's `main(args) -> int` is the handler; it calls the engine (harness.suites,
harness.runner, harness.executors, harness.store, harness.report, harness.check, ...) and raises
`UsageError` for bad command-line input (exit status 2).
"""


class UsageError(Exception):
    """Bad input from the command line: printed as one clear message, exit status 2."""
