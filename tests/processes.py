"""Helpers for tests that signal real harness processes."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """`preexec_fn` of a child a test sends Ctrl-C (SIGINT): SIGINT back to its default disposition.

    A job started in the background of a non-interactive shell (`nohup ... &`, some CI runners)
    inherits SIGINT ignored, and a Python started so never raises KeyboardInterrupt; the terminal's
    Ctrl-C the test stands for reaches a foreground job, whose SIGINT is the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
