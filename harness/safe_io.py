"""Bounded reading of every file the harness is handed (a suite, a checks file, a run folder):
one reader, so that no file can hang a command, exhaust memory or the stack, or steer a path.

* `read_bytes(path, kind)`: a regular file only (a FIFO, device or socket is refused before a byte
  is read; a symlink is followed and its target checked the same way), at most `LIMITS[kind]` bytes.
* `read_text` / `read_json` / `parse_json`: the same, as UTF-8 text or JSON nested at most
  `MAX_JSON_DEPTH` deep (checked before parsing: `json.loads` of 100,000 nested brackets overflows
  the stack).
* `check_name(value, what)`: a field of a stored file that becomes part of a path must be a plain
  folder name; `check_under(path, root)`: an output path stays under its root.
* `terminal_text(text)`: text from a file, printed, shows its control characters as escapes.

Every refusal is an `InputFileError` naming the file and what is wrong (the CLI exits 2)::

    info = read_json(run_dir / "run.json", "run.json")
    folder = check_under(base / check_name(info["suite"], "suite", where), base)
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from harness.units import MIB

# Size caps per kind of file, in bytes: generous for what the harness writes, small enough that a
# hostile file cannot exhaust memory. A run.json holds the suite text (<= 1 MiB) and the environment.
LIMITS = {
    "yaml": 1 * MIB,
    "run.json": 8 * MIB,
    "cell": 16 * MIB,  # cells/<key>.json: one row, with its samples and learning curve
    "note": 1 * MIB,  # running/<key>.json, .lock, baseline.json
    "jobs.json": 16 * MIB,
    "parquet": 1024 * MIB,
    "checkpoint": 8192 * MIB,
    "data": 16384 * MIB,  # quality tasks' data files (enwik8, imagenet64 .npz)
}
MAX_JSON_DEPTH = 64  # nesting of objects and arrays; the harness writes at most 6
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")  # a plain folder / file name


class InputFileError(ValueError):
    """A file or field that cannot be used as input: str is "<path>: <problem>"; both apart too."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}" if str(path) else problem)


def _describe(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | Path, kind: str, what: str | None = None) -> int:
    """The size in bytes of `path`, a regular file (after following symlinks) of at most
    LIMITS[kind] bytes; InputFileError otherwise. Opens nothing (stat only)."""
    what = what or kind
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputFileError(path, f"{what} not found") from None
    except OSError as error:
        raise InputFileError(path, f"cannot read {what} ({error.strerror or error})") from None
    return _checked_size(path, info, kind, what)


def _checked_size(path: str | Path, info: os.stat_result, kind: str, what: str) -> int:
    if not stat.S_ISREG(info.st_mode):
        raise InputFileError(path, f"{what} is {_describe(info.st_mode)}, not a regular file")
    limit = LIMITS[kind]
    if info.st_size > limit:
        raise InputFileError(path, f"{what} is {info.st_size:,} bytes, larger than the {limit:,} allowed")
    return info.st_size


def read_bytes(path: str | Path, kind: str, what: str | None = None) -> bytes:
    """The bytes of the regular file `path` (symlinks followed, the target checked), at most
    LIMITS[kind]; InputFileError naming the file otherwise. A FIFO is opened non-blocking and refused,
    so it never hangs; a file that grows past the cap while read is refused too."""
    what = what or kind
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputFileError(path, f"{what} not found") from None
    except OSError as error:
        if error.errno == errno.ENXIO:  # a FIFO or socket with nothing on the other end
            raise InputFileError(path, f"{what} is a FIFO or socket, not a regular file") from None
        raise InputFileError(path, f"cannot read {what} ({error.strerror or error})") from None
    try:
        _checked_size(path, os.fstat(fd), kind, what)
        chunks, total, limit = [], 0, LIMITS[kind]
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise InputFileError(path, f"{what} is larger than the {limit:,} bytes allowed")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as error:
        raise InputFileError(path, f"cannot read {what} ({error.strerror or error})") from None
    finally:
        os.close(fd)


def read_text(path: str | Path, kind: str, what: str | None = None) -> str:
    """`read_bytes` decoded as UTF-8 (InputFileError for other encodings)."""
    data = read_bytes(path, kind, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputFileError(path, f"cannot read {what or kind}: not UTF-8 text ({error.reason} at byte {error.start})") from None


_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: linear and fast


def json_depth(text: str) -> int:
    """The deepest nesting of objects and arrays in JSON `text` (brackets inside strings ignored);
    linear time, no recursion."""
    skeleton = _STRINGS.sub("", text)
    codes = np.frombuffer(skeleton.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    steps = np.isin(codes, (ord("["), ord("{"))).astype(np.int64) - np.isin(codes, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max()) if len(steps) else 0


def parse_json(text: str, where: str | Path = "JSON text") -> Any:
    """json.loads of `text`, nested at most MAX_JSON_DEPTH deep; InputFileError naming `where` otherwise."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise InputFileError(where, f"JSON nested {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as error:
        raise InputFileError(where, f"unreadable JSON ({error})") from None


def read_json(path: str | Path, kind: str, what: str | None = None) -> Any:
    """The JSON data of the file `path`, bounded as `read_text` and `parse_json`."""
    return parse_json(read_text(path, kind, what), path)


def check_name(value: Any, what: str, where: str | Path = "") -> str:
    """`value` if it is a plain name (letters, digits, '_', '.', '-'; not starting with '.' or '-';
    no '/' and no '..'), fit to be one part of a path; InputFileError naming `what` and `where`."""
    if isinstance(value, str) and NAME_PATTERN.fullmatch(value):
        return value
    raise InputFileError(where, f"{what} {value!r} is not a plain name (letters, digits, '_', '.', '-'; no '/', no '..')")


# Characters that steer a terminal rather than show: C0 controls but tab and newline, DEL, C1 controls
# (0x9b is a one-byte CSI), the direction marks, overrides and isolates that reorder what is shown,
# the Unicode line and paragraph separators, and lone surrogates (valid in JSON, not encodable as
# UTF-8: printing one raised).
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def terminal_text(text: str) -> str:
    """`text` with every `CONTROL_CHARACTERS` match written as its escape (ESC as ``\\x1b``, CR as
    ``\\r``): a label or message from a file cannot move the cursor, clear or retitle the terminal
    that prints it, or reorder the line. Newlines and tabs stay."""
    return CONTROL_CHARACTERS.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def check_under(path: str | Path, root: str | Path) -> Path:
    """`path` if, with symlinks resolved, it lies in `root` (or is `root`); InputFileError otherwise."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise InputFileError(path, f"resolves to {resolved}, outside {base}")
    return Path(path)
