"""harness.report.folders.shown_path: how reports and run summaries name a path."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.report.folders import shown_path


def test_a_path_inside_the_working_directory_is_named_relative_however_it_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "results" / "seq_length" / "20261207T000000Z-cpu"
    assert shown_path(run) == "results/seq_length/20261207T000000Z-cpu"
    assert shown_path("results/seq_length/../seq_length/20261207T000000Z-cpu") == "results/seq_length/20261207T000000Z-cpu"


def test_a_path_outside_the_working_directory_is_named_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert shown_path("../elsewhere/run") == f"{tmp_path.as_posix()}/elsewhere/run"
