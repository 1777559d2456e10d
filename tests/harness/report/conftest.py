"""The synthetic runs the report and compare tests read (tests/harness/report/report_fixtures.py),
built once per test module under a temporary results root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.report import report_fixtures as fx


@pytest.fixture(scope="module")
def results_root(tmp_path_factory) -> Path:
    """A results root holding one seq_length and one layers_memory run (see report_fixtures)."""
    root = tmp_path_factory.mktemp("results")
    fx.seq_length_run(root)
    fx.layers_memory_run(root)
    return root


@pytest.fixture(scope="module")
def seq(results_root) -> Path:
    return results_root / fx.SEQ_SUITE / fx.SEQ_RUN_ID


@pytest.fixture(scope="module")
def layers(results_root) -> Path:
    return results_root / fx.LAYERS_SUITE / fx.LAYERS_RUN_ID


@pytest.fixture(scope="module")
def disturbed(results_root, seq) -> Path:
    """The seq_length run measured in rounds on a busy machine (`report_fixtures.disturbed_run`)."""
    return fx.disturbed_run(results_root, seq)
