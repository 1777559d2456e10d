"""harness.safe_io: the one bounded reader refuses special files, oversize files, deep JSON and
path-like names quickly and with a message naming the file; ordinary files read as before."""

from __future__ import annotations

import json
import os
import time

import pytest

from harness.safe_io import (
    LIMITS,
    MAX_JSON_DEPTH,
    InputFileError,
    check_name,
    check_under,
    json_depth,
    parse_json,
    read_bytes,
    read_json,
    terminal_text,
)


def test_regular_files_read_and_json_parses(tmp_path):
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"a": [1, {"b": "[{"}]}))
    assert read_json(file, "run.json") == {"a": [1, {"b": "[{"}]}
    assert read_bytes(file, "note") == file.read_bytes()


def test_a_fifo_is_refused_at_once_never_read(tmp_path):
    fifo = tmp_path / "run.json"
    os.mkfifo(fifo)
    begin = time.monotonic()
    with pytest.raises(InputFileError, match=r"run\.json: run\.json is a FIFO"):
        read_json(fifo, "run.json")
    assert time.monotonic() - begin < 5  # it used to block forever in open()


def test_a_symlink_to_a_device_and_a_directory_are_refused(tmp_path):
    link = tmp_path / "cell.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(InputFileError, match="is a character device, not a regular file"):
        read_bytes(link, "cell")
    with pytest.raises(InputFileError, match="is a directory"):
        read_bytes(tmp_path, "cell")
    with pytest.raises(InputFileError, match="missing.json: cell not found"):
        read_bytes(tmp_path / "missing.json", "cell")


def test_a_file_over_its_kind_s_cap_is_refused_naming_the_limit(tmp_path, monkeypatch):
    monkeypatch.setitem(LIMITS, "note", 100)
    file = tmp_path / ".lock"
    file.write_bytes(b"x" * 101)
    with pytest.raises(InputFileError, match=r"\.lock: note is 101 bytes, larger than the 100 allowed"):
        read_bytes(file, "note")
    file.write_bytes(b"x" * 100)
    assert len(read_bytes(file, "note")) == 100


def test_json_nested_100000_deep_is_refused_before_parsing():
    text = "[" * 100_000 + "]" * 100_000
    begin = time.monotonic()
    with pytest.raises(InputFileError, match=f"JSON nested 100000 levels deep, more than the {MAX_JSON_DEPTH} allowed"):
        parse_json(text, "run.json")
    assert time.monotonic() - begin < 5
    assert json_depth('{"a": "[[[[[[", "b": [[1], {"c": "\\"]]]"}]}') == 3  # brackets in strings do not count
    assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None


@pytest.mark.parametrize("bad", ["../../x", "/abs", "a/b", "", ".", "..", ".hidden", "-rf", "a\x00b", "x" * 201, 3, None, ["a"]])
def test_check_name_refuses_anything_but_a_plain_name(bad):
    with pytest.raises(InputFileError, match="is not a plain name"):
        check_name(bad, "field 'suite'", "run.json")


def test_check_name_and_check_under_accept_plain_names(tmp_path):
    assert check_name("seq_length", "suite") == "seq_length" and check_name("20261123T121443Z-amd-epyc", "run id")
    assert check_under(tmp_path / "a" / "b", tmp_path) == tmp_path / "a" / "b"
    (tmp_path / "link").symlink_to("/tmp")
    with pytest.raises(InputFileError, match="outside"):
        check_under(tmp_path / "link" / "x", tmp_path)
    with pytest.raises(InputFileError, match="outside"):
        check_under(tmp_path / ".." / "x", tmp_path)


def test_terminal_text_shows_control_characters_as_escapes():
    """What would steer a terminal (OSC retitle ending in BEL, CSI clear, CR overwrite, the one-byte
    C1 CSI, DEL, a right-to-left override) is shown as its Python escape; text, tabs and newlines stay."""
    hostile = "a\x1b]0;owned\x07 b\x1b[2J c\roverwritten \x9b31m d\x7f e\u202egnp.exe f\x00"
    shown = terminal_text(hostile)
    assert shown == "a\\x1b]0;owned\\x07 b\\x1b[2J c\\roverwritten \\x9b31m d\\x7f e\\u202egnp.exe f\\x00"
    assert not any(ord(ch) < 32 or 127 <= ord(ch) < 160 or 0x202A <= ord(ch) <= 0x202E for ch in shown)
    assert terminal_text("lsh n_hashes=8\tL=16384\nok é ü 長") == "lsh n_hashes=8\tL=16384\nok é ü 長"
    assert terminal_text("a\ud800b\u2028c\u200fd") == "a\\ud800b\\u2028c\\u200fd"  # a lone surrogate can be printed now
