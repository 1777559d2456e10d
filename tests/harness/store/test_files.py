"""harness.store.files: atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from harness.store import files
from harness.store.files import atomic_write_bytes, atomic_write_json


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "data.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["data.json"]


def test_failed_atomic_write_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]
