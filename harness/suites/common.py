"""What both kinds of suite share: reading the YAML with line numbers, errors that name the file,
line, key path and what is allowed, `cpu:` / `cuda:` overrides, the `slurm:` block, and selecting
cells with --filter expressions. The loaders are harness.suites.benchmark and harness.suites.quality.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.cells import NOT_MODEL_KEYS, Cell
from harness.expressions import ExpressionError, parse_expression, select_rows
from harness.overrides import Override, OverrideError, apply_overrides
from harness.safe_yaml import YAMLInputError, compose_yaml, read_yaml_text
from harness.store.schema import DEVICE, KIND, KIND_BENCHMARK, KIND_QUALITY, canonical_json
from variants.registry import type_matches, type_name

Device = Literal["auto", "cpu", "cuda"]
KeyPath = tuple[Any, ...]  # a key path: ("variants", 2, "n_hashes")
SUITE_KINDS = (KIND_BENCHMARK, KIND_QUALITY)


class SuiteError(Exception):
    """Invalid suite; str is a human message with file, line, key path, problem and what is allowed."""

    def __init__(self, message: str, file: str | Path | None = None, path: str = "", line: int | None = None):
        self.file, self.path, self.line, self.problem = file, path, line, message
        where = str(file) if file is not None else ""
        if where and line is not None:
            where += f":{line}"
        prefix = ": ".join(p for p in (where, path) if p)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class Strict(BaseModel):
    """Base of every suite schema: unknown keys and wrong types are errors (no coercion)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # .inf / .nan: "finite number" errors


class SlurmSpec(Strict):
    """The `slurm:` block: resources of the Slurm jobs of `harness run --executor submitit`
    (command-line --slurm-* options override it). One array task per group of cells."""

    partition: Optional[str] = None
    time_min: int = Field(60, ge=1)  # per job; a job that runs out is requeued and resumes its group
    gpus_per_node: Optional[int] = Field(None, ge=0)  # default: 1 for CUDA suites, 0 on CPU
    cpus_per_task: Optional[int] = Field(None, ge=1)
    mem_gb: Optional[float] = Field(None, gt=0)
    array_parallelism: int = Field(32, ge=1)  # at most this many array tasks at once
    extra: dict[str, Any] = {}  # more submitit `slurm_*` parameters, without the prefix (e.g. account, qos)


# --------------------------------------------------------------------------- locations


def format_path(path: KeyPath) -> str:
    """("variants", 2, "n_hashes") -> "variants[2].n_hashes"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class Locator:
    """Maps key paths of the (merged) suite data to display paths and line numbers in the file."""

    def __init__(self, file: Path, lines: dict[KeyPath, int]):
        self.file = file
        self.lines = lines
        self.redirects: dict[KeyPath, KeyPath] = {}  # merged path -> where it came from (cpu:/cuda:)
        self.overrides: list[Override] = []  # --set arguments (harness.overrides): errors under their paths name them
        self.merged: dict[str, Any] = {}  # the data after the cpu:/cuda: merge and the overrides (--print-config)

    def source(self, path: KeyPath) -> KeyPath:
        for n in range(len(path), 0, -1):
            if path[:n] in self.redirects:
                return self.redirects[path[:n]] + tuple(path[n:])
        return tuple(path)

    def error(self, path: KeyPath, message: str) -> SuiteError:
        source = self.source(path)
        for override in reversed(self.overrides):  # the latest --set on a path is the one in force
            if any(tuple(p[: len(override.path)]) == override.path for p in (tuple(path), source)):
                return SuiteError(message, self.file, f"--set {override.text}: {format_path(path)}")
        around = [o.text for o in self.overrides if tuple(o.path[: len(path)]) == tuple(path)]
        if around:
            message += f" (after --set {', --set '.join(around)})"
        line = next((self.lines[source[:n]] for n in range(len(source), -1, -1) if source[:n] in self.lines), None)
        return SuiteError(message, self.file, format_path(source), line)


def _line_map(node: yaml.Node, file: Path, path: KeyPath = ()) -> dict[KeyPath, int]:
    """Key path -> 1-based line of the key (mappings) or item (sequences); rejects duplicate keys."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise SuiteError(f"duplicate key {key!r} (first on line {seen[key]})", file, format_path(path + (key,)), line)
            seen[key] = line
            lines.update(_line_map(value_node, file, path + (key,)))
            lines[path + (key,)] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_map(item, file, path + (i,)))
    return lines


def parse_suite_yaml(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    """(data, key path -> line) of a suite file, read with the bounds of harness.safe_yaml
    (size, no anchors/aliases) and rejecting duplicate keys; SuiteError for any problem."""
    try:
        data, node = compose_yaml(read_yaml_text(path, "suite file"), path)
    except YAMLInputError as error:
        raise SuiteError(error.problem, path, line=error.line) from None
    return data, (_line_map(node, path) if node is not None else {})


# --------------------------------------------------------------------------- helpers


def describe_fields(fields: dict[str, tuple[Any, Any]]) -> str:
    """ "name (type, default value)" of each field, comma-separated: what an error message allows."""

    def one(name: str, annotation: Any, default: Any) -> str:
        if default is dataclasses.MISSING:
            return f"{name} ({type_name(annotation)}, required)"
        return f"{name} ({type_name(annotation)}, default {default!r})"

    return ", ".join(one(n, a, d) for n, (a, d) in fields.items())


def did_you_mean(key: Any, allowed: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `allowed`, or ''."""
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def merge_override(base: dict, over: dict, path: KeyPath, origin: KeyPath, locator: Locator) -> None:
    """Deep-merge `over` into `base` (dicts merge, everything else replaces), recording origins."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_override(base[key], value, path + (key,), origin + (key,), locator)
        else:
            base[key] = value
            locator.redirects[path + (key,)] = origin + (key,)


def pydantic_error(error: ValidationError, locator: Locator, schemas: dict[KeyPath, type[BaseModel]], prefix: KeyPath = ()) -> SuiteError:
    """The first pydantic error as a SuiteError at its key path: unknown keys with the allowed ones
    (from `schemas`: key path -> schema), missing keys, a validator's own message, or the expected
    type and what was given; `prefix` is where the validated data sits in the file."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        schema = schemas.get(prefix + loc[:-1])
        allowed = f"; allowed keys: {', '.join(schema.model_fields)}" if schema else ""
        message = f"unknown key {loc[-1]!r}{did_you_mean(loc[-1], schema.model_fields if schema else ())}{allowed}"
    elif kind == "missing":
        message = f"required key {loc[-1]!r} is missing"
    elif kind == "value_error":  # a validator's own message (e.g. an expression outside the language)
        message = str(first["ctx"]["error"])
    else:
        got = first.get("input")
        message = f"{first['msg']}, got {got!r}"
        if isinstance(got, str) and _is_number(got):
            message += " (YAML reads numbers like 3e-3 as text: write 3.0e-3 or 0.003)"
    more = len(error.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return locator.error(prefix + loc, message)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_model_keys(model: Any, fields: dict[str, tuple[Any, Any]], locator: Locator) -> dict[str, Any]:
    """A suite's `model:` block: a mapping of ReformerLMConfig fields (`fields`, from
    `cells.model_fields`) of the right types; `attention` / `attention_params` come from
    `variants:`. Returns a copy; SuiteError at the offending key."""
    if not isinstance(model, dict):
        raise locator.error(("model",), f"model must be a mapping of ReformerLM settings, got {model!r}")
    for key, value in model.items():
        if key in NOT_MODEL_KEYS:
            raise locator.error(("model", key), f"{key!r} is set by the `variants:` list, not by `model:`")
        if key not in fields:
            raise locator.error(("model", key), f"unknown model key {key!r}{did_you_mean(key, fields)}; allowed: {describe_fields(fields)}")
        if not type_matches(value, fields[key][0]):
            raise locator.error(("model", key), f"must be {type_name(fields[key][0])}, got {value!r}")
    return dict(model)


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when available, else "cpu"; other names unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


MAX_THREADS = 1024  # as `--threads`
MAX_SECONDS = 7 * 24 * 3600.0  # any time limit of a suite: a week
MAX_CELLS = 10_000  # cells of one suite: days of work on a GPU even at a few seconds a cell


def check_cell_count(count: int, locator: Locator, where: KeyPath, detail: str) -> None:
    """SuiteError when a suite would expand into more than MAX_CELLS cells (checked from the sizes
    of the sweep lists, before any cell is built): the count, where it comes from and how to narrow."""
    if count > MAX_CELLS:
        raise locator.error(
            where,
            f"this suite expands into {count:,} cells ({detail}), more than the {MAX_CELLS:,} allowed; "
            "sweep fewer values, split it into several suites, or run part of it with --filter",
        )


def check_suite_name(name: str, locator: Locator) -> str:
    """`name` when it can name a results folder (letters, digits, '_', '.', '-'), else SuiteError."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise locator.error(("name",), f"{name!r}: use only letters, digits, '_', '.', '-' (it names the results folder)")
    return name


def merged_for_device(
    data: dict[str, Any],
    device: str | None,
    locator: Locator,
    override_schema: type[BaseModel],
    schemas: dict[KeyPath, type[BaseModel]],
    replace_whole: tuple[str, ...] = (),
) -> tuple[dict[str, Any], str]:
    """(the suite data with the resolved device's `cpu:` / `cuda:` block deep-merged over it, the
    device "cpu" / "cuda"). `device` (auto|cpu|cuda, --device) overrides the file's `device:`. The
    override blocks are validated first, so their errors point into them; keys in `replace_whole`
    whose override names another `name` replace the base value instead of merging into it (a
    quality suite's `task:`)."""
    for block in ("cpu", "cuda"):
        if data.get(block) is not None:
            try:
                override_schema.model_validate(data[block])
            except ValidationError as error:
                raise pydantic_error(error, locator, schemas, (block,)) from None
    devices = typing.get_args(Device)
    if device is not None and device not in devices:
        raise SuiteError(f"device override {device!r} is not one of: {', '.join(devices)}", locator.file)
    requested = device or data.get(DEVICE, "auto")
    if requested not in devices:
        raise locator.error((DEVICE,), f"{requested!r} is not one of: {', '.join(devices)}")
    resolved = resolve_device(requested)
    merged = {k: v for k, v in data.items() if k not in ("cpu", "cuda")}
    override = data.get(resolved)
    if isinstance(override, dict):
        override = {k: v for k, v in override.items() if v is not None}
        for key in replace_whole:
            over, base = override.get(key), merged.get(key)
            if isinstance(over, dict) and isinstance(base, dict) and over.get("name", base.get("name")) != base.get("name"):
                merged[key] = dict(over)  # another task (say): replaced, not merged
                locator.redirects[(key,)] = (resolved, key)
                del override[key]
        merge_override(merged, override, (), (resolved,), locator)
    try:  # --set wins over the cpu:/cuda: block (harness.overrides)
        apply_overrides(merged, [o for o in locator.overrides if not o.early])
    except OverrideError as error:
        raise SuiteError(str(error), locator.file) from None
    locator.merged = merged
    return merged, resolved


def suite_kind(data: Any, locator: Locator) -> str:
    """ "benchmark" or "quality": the `kind:` key, else "quality" when there is a `train:` block."""
    if not isinstance(data, dict):
        return KIND_BENCHMARK
    kind = data.get(KIND, KIND_QUALITY if "train" in data else KIND_BENCHMARK)
    if kind not in SUITE_KINDS:
        raise locator.error((KIND,), f"unknown suite kind {kind!r}{did_you_mean(kind, SUITE_KINDS)}; kinds: {', '.join(SUITE_KINDS)}")
    return kind


def values_text(value: Any) -> str:
    """A parameter value as labels show it: JSON for lists and mappings, str otherwise."""
    return canonical_json(value) if isinstance(value, (list, tuple, dict)) else str(value)


# --------------------------------------------------------------------------- selection


def filter_cells(cells: list[Cell], expr: str) -> list[Cell]:
    """The cells whose `to_row()` columns satisfy `expr` (the safe language of harness.expressions,
    e.g. "variant == 'lsh' and seq_len <= 4096"); SuiteError for an expression outside it."""
    import pandas as pd

    try:
        expression = parse_expression(expr)
        if not cells:
            return []
        frame = pd.DataFrame([c.to_row() for c in cells])
        selected = select_rows(frame, expression)
    except ExpressionError as error:
        raise SuiteError(f"bad filter: {error}") from None
    return [cells[i] for i in selected.index]
