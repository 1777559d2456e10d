"""Fixtures of the selfcheck's tests: the in-process checks on one torch thread, and a CPU context."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.selfcheck.framework import Context


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process checks on one torch thread: tiny ops on two threads crawl when another job holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_context(tmp_path: Path) -> Context:
    """What a check gets on the CPU: --quick, and the test's tmp_path as its scratch folder."""
    return Context(torch.device("cpu"), True, tmp_path)
