"""Bounded YAML reading for every file the harness is handed: suites, checks files, stored suite text.

PyYAML's SafeLoader builds no Python objects, but it still expands anchors and aliases: a
"billion laughs" document of a few hundred bytes composes into billions of nodes. No shipped
suite needs them, so anchors (`&name`), aliases (`*name`) and merge keys are rejected outright, as is nesting deeper
than `MAX_DEPTH`; files above `MAX_YAML_BYTES` are refused before they are parsed; and the errors that
PyYAML lets through (an out-of-range date, an integer of 5,000 digits, nesting deep enough to
exhaust the stack) become the same clean `YAMLInputError`::

    data, node = compose_yaml(text, "suites/smoke.yaml")   # node: for line numbers
    data = load_yaml(text, "run.json suite_text")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from harness.safe_io import LIMITS, InputFileError, read_text

MAX_YAML_BYTES = LIMITS["yaml"]  # a suite is a page of settings; 1 MiB is generous
MAX_DEPTH = 32  # nesting of mappings and lists; shipped suites use at most 5


class YAMLInputError(ValueError):
    """Unusable YAML input: str is "<where>[:line]: problem"; `problem` and `line` (1-based or None) apart."""

    def __init__(self, problem: str, where: str | Path = "", line: int | None = None):
        self.problem, self.where, self.line = problem, str(where), line
        location = f"{where}:{line}" if where and line is not None else str(where)
        super().__init__(f"{location}: {problem}" if location else problem)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases as it composes, before anything is expanded."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(event.start_mark, "YAML anchors and aliases are not allowed (found an alias, *name); write the values out")
        if getattr(event, "anchor", None) is not None:
            raise _Refused(event.start_mark, "YAML anchors and aliases are not allowed (found an anchor, &name); write the values out")
        if self.depth >= MAX_DEPTH:
            raise _Refused(event.start_mark, f"YAML nested deeper than {MAX_DEPTH} levels")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Refused(Exception):
    def __init__(self, mark: Any, problem: str):
        super().__init__(problem)
        self.mark, self.problem = mark, problem


def read_yaml_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of a YAML file, read by the bounded reader `harness.safe_io.read_text` (a
    regular file of at most MAX_YAML_BYTES: never a FIFO or device); YAMLInputError otherwise."""
    try:
        return read_text(path, "yaml", what)
    except InputFileError as error:
        raise YAMLInputError(error.problem, error.path) from None


def compose_yaml(text: str, where: str | Path = "") -> tuple[Any, yaml.Node | None]:
    """(data, node tree) of one YAML document; the node tree gives line numbers. YAMLInputError for
    anything unusable: bad syntax, anchors/aliases, oversize, values PyYAML cannot construct."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise YAMLInputError(f"YAML text is larger than the {MAX_YAML_BYTES:,} allowed bytes", where)
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader already rejects unprintable characters
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _Refused as error:
        raise YAMLInputError(error.problem, where, error.mark.line + 1) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = " ".join(str(p) for p in (getattr(error, "context", None), getattr(error, "problem", None)) if p)
        raise YAMLInputError(f"invalid YAML: {problem or error}", where, mark.line + 1 if mark else None) from None
    except RecursionError:
        raise YAMLInputError("invalid YAML: nested too deeply", where) from None
    except (ValueError, TypeError, OverflowError) as error:  # e.g. a date of month 13, a 5,000-digit integer
        raise YAMLInputError(f"invalid YAML value: {error}", where) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, node


def load_yaml(text: str, where: str | Path = "") -> Any:
    """The data of one YAML document, with the bounds of `compose_yaml`."""
    return compose_yaml(text, where)[0]
