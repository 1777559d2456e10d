"""harness.safe_yaml: hostile YAML ends quickly in a clean exit-2 error, never a traceback or a hang."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.safe_yaml import MAX_YAML_BYTES, YAMLInputError, load_yaml

VALID_TAIL = "sweep: {seq_len: [64]}\nvariants: [{name: full}]\n"


def billion_laughs(levels: int) -> str:
    """The classic alias bomb: `levels` lists of 9 aliases to the level below (9**levels leaves)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n" + VALID_TAIL


HOSTILE = {
    "billion laughs, 9 levels": (billion_laughs(9), ":1: YAML anchors and aliases are not allowed"),
    "a single alias": ("model: &m {d_model: 64}\nother: *m\n" + VALID_TAIL, "anchors and aliases are not allowed"),
    "merge key": ("base: &b {warmup: 1}\nmeasure: {<<: *b}\n" + VALID_TAIL, "anchors and aliases are not allowed"),
    "deep nesting": ("x: " + "[" * 5000 + "]" * 5000 + "\n" + VALID_TAIL, "nested deeper than 32 levels"),
    "month 13": ("when: 2001-13-01\n" + VALID_TAIL, "invalid YAML value: month must be in 1..12"),
    "5,000-digit integer": ("n: " + "9" * 5000 + "\n" + VALID_TAIL, "invalid YAML value"),
    "python object tag": ("x: !!python/object/apply:os.system ['touch pwned']\n" + VALID_TAIL, "invalid YAML"),
    "oversize": ("# " + "x" * MAX_YAML_BYTES + "\n" + VALID_TAIL, "larger than the 1,048,576 allowed"),
    "not UTF-8": (b"\xff\xfe name: x\n", "cannot read suite file"),
    "unprintable character": ("\x0c\n" + VALID_TAIL, "special characters are not allowed"),  # found by the fuzzer
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_suites_exit_2_with_a_message_and_no_traceback(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text, problem = HOSTILE[case]
    path = tmp_path / "hostile.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    begin = time.monotonic()
    code = main(["run", str(path), "--dry-run", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and problem in err and "Traceback" not in err, err
    assert time.monotonic() - begin < 10  # the bomb used to keep --dry-run busy past 60 s
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_ordinary_yaml_still_loads():
    assert load_yaml("a: [1, 2, {b: c}]\nd: 2024-01-02\n") == {"a": [1, 2, {"b": "c"}], "d": __import__("datetime").date(2024, 1, 2)}
    with pytest.raises(YAMLInputError) as error:
        load_yaml("a: [1, 2", "where.yaml")
    assert str(error.value).startswith("where.yaml:") and "invalid YAML" in str(error.value)


@pytest.mark.parametrize("kind", ["/dev/zero", "a FIFO", "a link to /dev/zero"])
def test_a_suite_that_is_a_device_or_fifo_is_refused_at_once(kind, tmp_path, capsys):
    import os

    path = tmp_path / "suite.yaml"
    if kind == "/dev/zero":
        path = Path("/dev/zero")
    elif kind == "a FIFO":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    begin = time.monotonic()
    code = main(["run", str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "not a regular file" in err and "Traceback" not in err, err
    assert time.monotonic() - begin < 10  # /dev/zero used to end in MemoryError, a FIFO to hang
