"""YAML benchmark suites: schema, validation with file/key path/line messages, expansion into cells.

A suite names a workload and mode, a model, a sweep (cartesian product of lists) and a list of
attention variants whose list-valued parameters expand too. `load_suite` validates everything up
front, so a bad suite fails with a `SuiteError` pointing at the offending key instead of a
traceback halfway through a run::

    suite = load_suite("suites/seq_length.yaml", device="cpu")
    for cell in suite.cells():
        cell.key(code_version), cell.attention_params(), cell.to_row()
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.check_rules import CHECK_SCHEMAS, ChecksSpec
from harness.expressions import ExpressionError, both, parse_expression, select_rows
from harness.safe_yaml import YAMLInputError, compose_yaml, read_yaml_text
from variants.registry import type_matches, type_name

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["float32", "float16", "bfloat16", "float64"]
Mode = Literal["forward", "forward_backward", "train_step"]
Workload = Literal["attention", "block", "model"]

SHAPE_KEYS = ("seq_len", "batch", "tokens_per_batch")
# Taken from `model:` rather than from a variant entry; the attention variant gets them from there.
MODEL_ATTENTION_KEYS = ("d_model", "n_heads", "causal")
NOT_MODEL_KEYS = ("attention", "attention_params")  # set by `variants:`
KeyPath = tuple[Any, ...]  # a key path: ("variants", 2, "n_hashes")


class SuiteError(Exception):
    """Invalid suite; str is a human message with file, line, key path, problem and what is allowed."""

    def __init__(self, message: str, file: str | Path | None = None, path: str = "", line: int | None = None):
        self.file, self.path, self.line, self.problem = file, path, line, message
        where = str(file) if file is not None else ""
        if where and line is not None:
            where += f":{line}"
        prefix = ": ".join(p for p in (where, path) if p)
        super().__init__(f"{prefix}: {message}" if prefix else message)


# --------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MeasureSpec(_Strict):
    """How each cell is timed (see harness.measure) and guarded (see harness.runner)."""

    warmup: int = Field(2, ge=0)
    min_repeats: int = Field(5, ge=1)
    min_time_s: float = Field(1.0, ge=0)
    max_repeats: int = Field(200, ge=1)
    max_time_s: float = Field(120.0, gt=0)
    flush_l2: bool = False
    threads: Optional[int] = Field(None, ge=1)
    timeout_s: float = Field(900.0, gt=0)
    memory_limit_gib: Optional[float] = Field(None, gt=0)
    skip_after_oom: bool = True
    # Measure the matmul rate (harness.measure.matmul_rate) in each cell's process after its timing:
    # result columns matmul_gflops, matmul_n, floor_s, floor_ratio (the time over the compute floor).
    matmul_rate: bool = False


class SlurmSpec(_Strict):
    """The `slurm:` block: resources of the Slurm jobs of `harness run --executor submitit`
    (command-line --slurm-* options override it). One array task per group of cells."""

    partition: Optional[str] = None
    time_min: int = Field(60, ge=1)  # per job; a job that runs out is requeued and resumes its group
    gpus_per_node: Optional[int] = Field(None, ge=0)  # default: 1 for CUDA suites, 0 on CPU
    cpus_per_task: Optional[int] = Field(None, ge=1)
    mem_gb: Optional[float] = Field(None, gt=0)
    array_parallelism: int = Field(32, ge=1)  # at most this many array tasks at once
    extra: dict[str, Any] = {}  # more submitit `slurm_*` parameters, without the prefix (e.g. account, qos)


class OverrideSpec(_Strict):
    """A `cpu:` / `cuda:` block: deep-merged over the suite when that device is used."""

    dtype: Optional[DType] = None
    mode: Optional[Mode] = None
    workload: Optional[Workload] = None
    model: Optional[dict[str, Any]] = None
    sweep: Optional[dict[str, Any]] = None
    variants: Optional[list[Any]] = None
    measure: Optional[dict[str, Any]] = None
    checks: Optional[dict[str, Any]] = None


class SuiteSpec(_Strict):
    """The top level of a suite file."""

    name: Optional[str] = None  # defaults to the file name without extension
    description: str = ""
    device: Device = "auto"
    dtype: DType = "float32"
    mode: Mode = "forward_backward"
    workload: Workload = "attention"
    model: dict[str, Any] = {}
    sweep: dict[str, Any]
    variants: list[dict[str, Any]]
    measure: MeasureSpec = MeasureSpec()
    cpu: Optional[OverrideSpec] = None
    cuda: Optional[OverrideSpec] = None
    checks: Optional[ChecksSpec] = None  # regression-check rules (harness.check_rules)
    slurm: Optional[SlurmSpec] = None  # Slurm resources for --executor submitit (harness.executors)


_SCHEMAS: dict[KeyPath, type[BaseModel]] = {
    (): SuiteSpec,
    ("measure",): MeasureSpec,
    ("slurm",): SlurmSpec,
    ("cpu",): OverrideSpec,
    ("cuda",): OverrideSpec,
    **CHECK_SCHEMAS,
}


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

    def source(self, path: KeyPath) -> KeyPath:
        for n in range(len(path), 0, -1):
            if path[:n] in self.redirects:
                return self.redirects[path[:n]] + tuple(path[n:])
        return tuple(path)

    def error(self, path: KeyPath, message: str) -> SuiteError:
        source = self.source(path)
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


def model_fields() -> dict[str, tuple[Any, Any]]:
    """ReformerLMConfig field -> (annotation, default or MISSING), without attention/attention_params."""
    from variants.model import ReformerLMConfig

    hints = typing.get_type_hints(ReformerLMConfig)
    out = {}
    for f in dataclasses.fields(ReformerLMConfig):
        if f.name in NOT_MODEL_KEYS:
            continue
        default = f.default
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        out[f.name] = (hints[f.name], default)
    return out


def describe_fields(fields: dict[str, tuple[Any, Any]]) -> str:
    """ "name (type, default value)" of each field, comma-separated: what an error message allows."""

    def one(name: str, annotation: Any, default: Any) -> str:
        if default is dataclasses.MISSING:
            return f"{name} ({type_name(annotation)}, required)"
        return f"{name} ({type_name(annotation)}, default {default!r})"

    return ", ".join(one(n, a, d) for n, (a, d) in fields.items())


def variant_fields(name: str) -> dict[str, tuple[Any, Any]]:
    """Registered variant `name`'s config field -> (annotation, default)."""
    import variants

    spec = variants.spec(name)
    hints = typing.get_type_hints(spec.config_cls)
    defaults = variants.describe(name)
    return {n: (hints[n], defaults[n][1]) for n in spec.parameters()}


def did_you_mean(key: Any, allowed: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `allowed`, or ''."""
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def jsonable(value: Any) -> Any:
    """Tuples -> lists recursively, so configs compare and hash the same after a JSON round trip."""
    return json.loads(json.dumps(value))


def canonical_json(data: Any) -> str:
    """Compact JSON with sorted keys: the text that cell keys are hashed from."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _fmt(value: Any) -> str:
    return canonical_json(value) if isinstance(value, (list, tuple, dict)) else str(value)


def merge_override(base: dict, over: dict, path: KeyPath, origin: KeyPath, locator: Locator) -> None:
    """Deep-merge `over` into `base` (dicts merge, everything else replaces), recording origins."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_override(base[key], value, path + (key,), origin + (key,), locator)
        else:
            base[key] = value
            locator.redirects[path + (key,)] = origin + (key,)


def _pydantic_error(error: ValidationError, locator: Locator, prefix: KeyPath = ()) -> SuiteError:
    """The first pydantic error as a SuiteError; `prefix` is where the validated data sits in the file."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        schema = _SCHEMAS.get(prefix + loc[:-1])
        allowed = f"; allowed keys: {', '.join(schema.model_fields)}" if schema else ""
        message = f"unknown key {loc[-1]!r}{did_you_mean(loc[-1], schema.model_fields if schema else ())}{allowed}"
    elif kind == "missing":
        message = f"required key {loc[-1]!r} is missing"
    elif kind == "value_error":  # a validator's own message (e.g. an expression outside the language)
        message = str(first["ctx"]["error"])
    else:
        message = f"{first['msg']}, got {first.get('input')!r}"
    more = len(error.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return locator.error(prefix + loc, message)


# --------------------------------------------------------------------------- cells

# Result-row columns that, with the model columns and the parsed variant_params, identify a cell's
# configuration independently of the code version (see `config_key_of`).
CONFIG_COLUMNS = ("workload", "mode", "device", "dtype", "seq_len", "batch", "tokens_per_batch", "variant")


@functools.lru_cache(maxsize=1)
def model_defaults() -> tuple[tuple[str, Any], ...]:
    """(name, default) of every model field, as plain JSON-able values (cached)."""
    return tuple((name, _plain(default)) for name, (_, default) in model_fields().items())


def _plain(value: Any) -> Any:
    """A result-row value as plain JSON-able Python, the same before and after a parquet round trip:
    NaN -> None, numpy scalars/arrays -> Python, integral floats -> int, JSON text -> its value."""
    if hasattr(value, "tolist"):  # numpy scalar or array
        value = value.tolist()
    if isinstance(value, float):
        return None if math.isnan(value) else (int(value) if value.is_integer() else value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return _plain(json.loads(value))
        except ValueError:
            return value
    return None if value is dataclasses.MISSING else value


def config_key_of(row: typing.Mapping[str, Any]) -> str:
    """Identity of a cell's configuration without the code version: what `harness check` matches a
    run's cells to a baseline's by. First 16 hex of a sha256 over the shape/variant columns, the
    parsed `variant_params` and the model columns that differ from the model's defaults (so adding a
    model field with a default keeps existing keys). Labels, suite name and measure settings are
    not part of it. Works on `Cell.to_row()` and on stored result rows alike."""
    identity = {column: _plain(row.get(column)) for column in CONFIG_COLUMNS}
    identity["variant_params"] = _plain(row.get("variant_params")) or {}
    for name, default in model_defaults():
        if name in row and _plain(row[name]) != default:
            identity[f"model.{name}"] = _plain(row[name])
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    """One point of a suite: a workload, shapes, model sizes, one attention variant, measure settings."""

    suite: str
    workload: str
    mode: str
    device: str
    dtype: str
    seq_len: int
    batch: int
    tokens_per_batch: int | None
    model: dict[str, Any]
    variant: str
    variant_params: dict[str, Any]
    label: str
    measure: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.key(""))

    def config_dict(self) -> dict[str, Any]:
        """The canonical JSON-able configuration of this cell."""
        return jsonable(dataclasses.asdict(self))

    def key(self, code_version: str) -> str:
        """Identity of (configuration, code version): first 16 hex of a sha256."""
        payload = canonical_json({"config": self.config_dict(), "code_version": code_version})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def group_key(self) -> str:
        """The key of this cell's configuration without its length: cells differing only in seq_len
        (and in batch when it is derived from tokens_per_batch) share it."""
        config = self.config_dict()
        config.pop("seq_len")
        if self.tokens_per_batch is not None:
            config.pop("batch")
        return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]

    def config_key(self) -> str:
        """`config_key_of(self.to_row())`: the configuration identity without the code version."""
        return self.to_row()["config_key"]

    def attention_params(self) -> dict[str, Any]:
        """Keyword arguments for `variants.build(cell.variant, **...)`."""
        return {key: self.model[key] for key in MODEL_ATTENTION_KEYS} | dict(self.variant_params)

    def to_row(self) -> dict[str, Any]:
        """Flat result-row columns (docs/architecture.md): shapes, model keys, variant and its params."""
        row: dict[str, Any] = {
            "workload": self.workload,
            "mode": self.mode,
            "device": self.device,
            "dtype": self.dtype,
            "seq_len": self.seq_len,
            "batch": self.batch,
            "tokens_per_batch": self.tokens_per_batch,
        }
        row.update(jsonable(self.model))
        row.update(variant=self.variant, variant_label=self.label, variant_params=canonical_json(self.variant_params))
        for name, value in jsonable(self.variant_params).items():
            # A variant parameter named like a model column (e.g. dropout) gets a prefix.
            column = name if name not in row else f"variant_{name}"
            if column not in row:
                row[column] = value
        row["config_key"] = config_key_of(row)
        return row


@dataclass
class Suite:
    """A validated suite; `cells()` lists its expansion."""

    name: str
    description: str
    path: Path
    device: str
    dtype: str
    mode: str
    workload: str
    model: dict[str, Any]
    sweep: dict[str, list[Any]]
    variants: list[dict[str, Any]]
    measure: dict[str, Any]
    checks: Optional[ChecksSpec] = None  # the `checks:` block, None when the suite has none
    slurm: dict[str, Any] = field(default_factory=lambda: SlurmSpec().model_dump())  # the `slurm:` block
    _cells: list[Cell] = field(default_factory=list, repr=False)

    def cells(self) -> list[Cell]:
        """Cells ordered by variant entry, its expansion, the other sweep keys, then seq_len ascending."""
        return list(self._cells)


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when available, else "cpu"; other names unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_suite(path: str | Path, device: str | None = None) -> Suite:
    """Read, validate and expand a suite file; `device` (auto|cpu|cuda) overrides the file's.

    Raises SuiteError (never anything else) for any problem with the file.
    """
    path = Path(path)
    data, lines = parse_suite_yaml(path)
    locator = Locator(path, lines)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise locator.error((), f"a suite must be a mapping of keys, got {got}; required keys: sweep, variants")

    # Validate the override blocks before merging so their errors point into them.
    for block in ("cpu", "cuda"):
        if block in data and data[block] is not None:
            try:
                OverrideSpec.model_validate(data[block])
            except ValidationError as error:
                raise _pydantic_error(error, locator, (block,)) from None

    if device is not None and device not in typing.get_args(Device):
        raise SuiteError(f"device override {device!r} is not one of: {', '.join(typing.get_args(Device))}", path)
    requested = device or data.get("device", "auto")
    if requested not in typing.get_args(Device):
        raise locator.error(("device",), f"{requested!r} is not one of: {', '.join(typing.get_args(Device))}")
    resolved = resolve_device(requested)

    merged = {k: v for k, v in data.items() if k not in ("cpu", "cuda")}
    override = data.get(resolved)
    if isinstance(override, dict):
        merge_override(merged, {k: v for k, v in override.items() if v is not None}, (), (resolved,), locator)
    try:
        spec = SuiteSpec.model_validate(merged)
    except ValidationError as error:
        raise _pydantic_error(error, locator) from None

    name = spec.name if spec.name is not None else path.stem
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise locator.error(("name",), f"{name!r}: use only letters, digits, '_', '.', '-' (it names the results folder)")
    measure = spec.measure.model_dump()
    if measure["min_repeats"] > measure["max_repeats"]:
        raise locator.error(
            ("measure", "max_repeats"), f"max_repeats={measure['max_repeats']} is below min_repeats={measure['min_repeats']}"
        )

    fields = model_fields()
    model = _check_model(spec.model, fields, locator)
    sweep = _check_sweep(spec.sweep, fields, locator)
    entries = _expand_variants(spec.variants, locator)
    suite = Suite(
        name,
        spec.description,
        path,
        resolved,
        spec.dtype,
        spec.mode,
        spec.workload,
        model,
        sweep,
        [dict(v) for v in spec.variants],
        measure,
    )
    suite._cells = _build_cells(suite, entries, fields, locator)
    suite.checks = spec.checks
    suite.slurm = (spec.slurm or SlurmSpec()).model_dump()
    _check_ratio_filters(suite, locator)
    return suite


def _check_ratio_filters(suite: Suite, locator: Locator) -> None:
    """Each ratio check's numerator and denominator (with its `at`) must select cells of the suite."""
    for i, ratio in enumerate(suite.checks.ratios if suite.checks else []):
        for side in ("numerator", "denominator"):
            expr = both(getattr(ratio, side), ratio.at)
            try:
                selected = filter_cells(suite.cells(), expr)
            except SuiteError as error:
                raise locator.error(("checks", "ratios", i, side), error.problem) from None
            if not selected:
                raise locator.error(("checks", "ratios", i, side), f"{expr!r} selects no cell of this suite")


def _check_model(model: dict[str, Any], fields: dict[str, tuple[Any, Any]], locator: Locator) -> dict[str, Any]:
    for key, value in model.items():
        if key in NOT_MODEL_KEYS:
            raise locator.error(("model", key), f"{key!r} is set by the `variants:` list, not by `model:`")
        if key not in fields:
            raise locator.error(("model", key), f"unknown model key {key!r}{did_you_mean(key, fields)}; allowed: {describe_fields(fields)}")
        annotation = fields[key][0]
        if not type_matches(value, annotation):
            raise locator.error(("model", key), f"must be {type_name(annotation)}, got {value!r}")
    return dict(model)


def _check_sweep(sweep: dict[str, Any], fields: dict[str, tuple[Any, Any]], locator: Locator) -> dict[str, list]:
    allowed = f"allowed keys: {', '.join(SHAPE_KEYS)} and the model keys {', '.join(fields)}"
    for key, values in sweep.items():
        if key in NOT_MODEL_KEYS:
            raise locator.error(("sweep", key), f"{key!r} is set by the `variants:` list, not swept")
        if key not in SHAPE_KEYS and key not in fields:
            raise locator.error(("sweep", key), f"unknown sweep key {key!r}{did_you_mean(key, [*SHAPE_KEYS, *fields])}; {allowed}")
        if not isinstance(values, list):
            raise locator.error(("sweep", key), f"must be a list of values (e.g. {key}: [{values!r}]), got {values!r}")
        if not values:
            raise locator.error(("sweep", key), "empty list: give at least one value")
        for i, value in enumerate(values):
            if key in SHAPE_KEYS:
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise locator.error(("sweep", key, i), f"{key} values must be positive integers, got {value!r}")
            elif not type_matches(value, fields[key][0]):
                raise locator.error(("sweep", key, i), f"{key} values must be {type_name(fields[key][0])}, got {value!r}")
            if value in values[:i]:
                raise locator.error(("sweep", key, i), f"duplicate value {value!r}")
    if "seq_len" not in sweep:
        raise locator.error(("sweep", "seq_len"), "required key 'seq_len' is missing (e.g. seq_len: [1024, 2048])")
    if "batch" in sweep and "tokens_per_batch" in sweep:
        raise locator.error(("sweep", "tokens_per_batch"), "give either batch or tokens_per_batch, not both")
    return {k: list(v) for k, v in sweep.items()}


@dataclass
class _Expansion:
    index: int  # position in `variants:`
    name: str
    params: dict[str, Any]
    value_index: dict[str, int]  # param -> index into its list, for list-valued params
    label: str | None
    varying_in_entry: list[str]  # list-valued params with more than one value
    seq_lens: list[int] | None = None  # the entry's own `seq_len:` list, replacing sweep.seq_len


def _expand_variants(entries: list[dict[str, Any]], locator: Locator) -> list[_Expansion]:
    import variants

    registered = variants.available("attention")
    if not entries:
        raise locator.error(("variants",), f"empty list: name at least one variant ({', '.join(registered)})")
    out = []
    for i, entry in enumerate(entries):
        name = entry.get("name")
        if name is None:
            raise locator.error(("variants", i), f"missing 'name'; registered attention variants: {', '.join(registered)}")
        if name not in registered:
            raise locator.error(
                ("variants", i, "name"),
                f"unknown variant {name!r}{did_you_mean(name, registered)}; registered attention variants: {', '.join(registered)}",
            )
        fields = variant_fields(name)
        label = entry.get("label")
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise locator.error(("variants", i, "label"), f"label must be a non-empty string, got {label!r}")
        seq_lens = entry.get("seq_len")
        if seq_lens is not None:
            if not isinstance(seq_lens, list) or not seq_lens:
                raise locator.error(
                    ("variants", i, "seq_len"),
                    f"must be a non-empty list of lengths replacing sweep.seq_len for this entry, got {seq_lens!r}",
                )
            for j, value in enumerate(seq_lens):
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value in seq_lens[:j]:
                    raise locator.error(("variants", i, "seq_len", j), f"seq_len values must be distinct positive integers, got {value!r}")
        choices: dict[str, list[Any]] = {}
        expanded: set[str] = set()
        for key, value in entry.items():
            if key in ("name", "label", "seq_len"):
                continue
            where = ("variants", i, key)
            if key in MODEL_ATTENTION_KEYS:
                raise locator.error(where, f"{key!r} comes from `model:` (set model.{key} or sweep it), not from a variant entry")
            if key not in fields:
                allowed = describe_fields({k: v for k, v in fields.items() if k not in MODEL_ATTENTION_KEYS})
                raise locator.error(
                    where, f"variant {name!r} does not take {key!r}{did_you_mean(key, fields)}; its parameters: {allowed}, plus label"
                )
            annotation = fields[key][0]
            takes_sequence = typing.get_origin(annotation) in (list, tuple) or any(
                typing.get_origin(a) in (list, tuple) for a in typing.get_args(annotation)
            )
            # A list expands into one variant per value, except a flat list for a sequence-typed parameter.
            expands = isinstance(value, list) and (not takes_sequence or all(isinstance(v, list) for v in value))
            if expands and not value:
                raise locator.error(where, "empty list: give at least one value")
            choices[key] = value if expands else [value]
            if expands:
                expanded.add(key)
        varying = [k for k in choices if k in expanded and len(choices[k]) > 1]
        for combo in itertools.product(*(enumerate(v) for v in choices.values())):
            params = {k: v for k, (_, v) in zip(choices, combo)}
            value_index = {k: j for k, (j, _) in zip(choices, combo) if k in expanded}
            out.append(_Expansion(i, name, params, value_index, label, varying, seq_lens))
    return out


def _labels(expansions: list[_Expansion], locator: Locator) -> list[str]:
    """Entry label (plus what varies within the entry) or auto: name + params that vary across
    all expansions of that variant name."""
    effective = []
    for e in expansions:
        defaults = {k: d for k, (_, d) in variant_fields(e.name).items() if k not in MODEL_ATTENTION_KEYS}
        effective.append(jsonable(defaults | e.params))
    labels = []
    for e, eff in zip(expansions, effective):
        if e.label is not None:
            labels.append(" ".join([e.label] + [f"{k}={_fmt(e.params[k])}" for k in e.varying_in_entry]))
            continue
        same = [f for x, f in zip(expansions, effective) if x.name == e.name]
        shown = [k for k in eff if len({_fmt(f.get(k)) for f in same}) > 1]
        labels.append(" ".join([e.name] + [f"{k}={_fmt(eff[k])}" for k in shown]))
    first: dict[str, tuple[int, dict]] = {}
    for e, label in zip(expansions, labels):
        if label in first and first[label][1] != e.params | {"name": e.name}:
            raise locator.error(
                ("variants", e.index), f"label {label!r} is also used by variants[{first[label][0]}]; give one a distinct `label:`"
            )
        first.setdefault(label, (e.index, e.params | {"name": e.name}))
    return labels


def _mentioned(keys: typing.Iterable[str], message: str) -> str | None:
    """The first of `keys` named as a word in `message`."""
    return next((k for k in keys if re.search(rf"\b{re.escape(k)}\b", message)), None)


def _model_path(key: str | None, swept_at: dict[str, int], suite: Suite) -> KeyPath:
    """Where a model value came from: its sweep entry, its `model:` key, or `model` itself."""
    if key in swept_at:
        return ("sweep", key, swept_at[key])
    return ("model", key) if key in suite.model else ("model",)


def _check_model_config(
    model: dict[str, Any], e: _Expansion, swept_at: dict[str, int], suite: Suite, cache: dict[str, Any], locator: Locator
) -> None:
    """ReformerLMConfig's own consistency check (residual/activation names, divisibility, ...)."""
    from variants.model import ReformerLMConfig

    signature = canonical_json(["model", e.name, model])
    if signature in cache:
        return
    try:
        ReformerLMConfig(**model, attention=e.name, attention_params={e.name: dict(e.params)}).validate()
    except (ValueError, TypeError) as error:
        where = _model_path(_mentioned(model, str(error)), swept_at, suite)
        raise locator.error(where, f"invalid model settings: {error}") from None
    cache[signature] = True


def _check_variant(
    e: _Expansion, model: dict[str, Any], swept_at: dict[str, int], suite: Suite, cache: dict[str, Any], locator: Locator
) -> Any:
    """The expanded parameters through `variants.make_config`, errors mapped to their key path;
    returns the config (cached by its parameters)."""
    import variants

    attention = {k: model[k] for k in MODEL_ATTENTION_KEYS}
    signature = canonical_json([e.name, attention, e.params])
    if signature in cache:
        return cache[signature]
    try:
        config = variants.make_config(e.name, **attention, **e.params)
    except (ValueError, TypeError) as error:
        message = str(error)
        named = re.search(r"parameter '(\w+)'", message)
        key = named.group(1) if named else _mentioned(list(e.params) + list(MODEL_ATTENTION_KEYS), message)
        if key in e.params:
            where: KeyPath = ("variants", e.index, key) + ((e.value_index[key],) if key in e.value_index else ())
        elif key in MODEL_ATTENTION_KEYS:
            where = _model_path(key, swept_at, suite)
        else:
            where = ("variants", e.index)
        fields = {k: v for k, v in variant_fields(e.name).items() if k not in MODEL_ATTENTION_KEYS}
        context = ", ".join(f"{k}={v!r}" for k, v in attention.items())
        raise locator.error(where, f"{message} (with model {context}); parameters of {e.name!r}: {describe_fields(fields)}") from None
    cache[signature] = config
    return config


def _check_seq_len(config: Any, e: _Expansion, seq_len: int, where: KeyPath, locator: Locator) -> None:
    """The variant's own length rule (`check_seq_len`, e.g. LSH's bucket_size must divide seq_len)."""
    check = getattr(config, "check_seq_len", None)
    if check is None:
        return
    try:
        check(seq_len)
    except ValueError as error:
        raise locator.error(where, f"variant {e.name!r} (variants[{e.index}]) cannot run at this length: {error}") from None


def _max_len(model: dict[str, Any]) -> int:
    """Longest sequence the LM's positional embedding covers (mirrors ReformerLM.max_len)."""
    axial = model.get("axial_shape")
    return model["max_seq_len"] if axial is None else min(model["max_seq_len"], math.prod(axial))


def _build_cells(suite: Suite, expansions: list[_Expansion], fields: dict[str, tuple[Any, Any]], locator: Locator) -> list[Cell]:
    missing = [k for k, (_, d) in fields.items() if d is dataclasses.MISSING and k not in suite.model and k not in suite.sweep]
    if missing:
        raise locator.error(("model",), f"required model key(s) missing: {', '.join(missing)}")
    base_model = {k: d for k, (_, d) in fields.items() if d is not dataclasses.MISSING} | suite.model
    labels = _labels(expansions, locator)
    other_keys = [k for k in suite.sweep if k != "seq_len"]
    cache: dict[str, Any] = {}
    cells: list[Cell] = []
    seen: dict[str, int] = {}
    for e, label in zip(expansions, labels):
        # An entry's own seq_len list replaces the sweep's (e.g. the longest lengths for one variant only).
        seq_len_at: KeyPath = ("variants", e.index, "seq_len") if e.seq_lens else ("sweep", "seq_len")
        seq_lens = sorted(enumerate(e.seq_lens or suite.sweep["seq_len"]), key=lambda iv: iv[1])
        for combo in itertools.product(*(enumerate(suite.sweep[k]) for k in other_keys)):
            chosen = {k: v for k, (_, v) in zip(other_keys, combo)}
            swept_at = {k: i for k, (i, _) in zip(other_keys, combo)}
            model = base_model | {k: v for k, v in chosen.items() if k not in SHAPE_KEYS}
            _check_model_config(model, e, swept_at, suite, cache, locator)
            config = _check_variant(e, model, swept_at, suite, cache, locator)
            for j, seq_len in seq_lens:
                tokens = chosen.get("tokens_per_batch")
                if tokens is not None:
                    if tokens % seq_len:
                        raise locator.error(
                            ("sweep", "tokens_per_batch", swept_at["tokens_per_batch"]),
                            f"tokens_per_batch={tokens} is not divisible by seq_len={seq_len} "
                            f"({format_path(locator.source(seq_len_at + (j,)))}); "
                            "use a multiple of every seq_len",
                        )
                    batch = tokens // seq_len
                else:
                    batch = chosen.get("batch", 1)
                _check_seq_len(config, e, seq_len, seq_len_at + (j,), locator)
                if suite.workload == "model" and seq_len > _max_len(model):
                    raise locator.error(
                        seq_len_at + (j,),
                        f"seq_len={seq_len} exceeds what the model's positional embedding covers "
                        f"({_max_len(model)}: max_seq_len={model['max_seq_len']}, "
                        f"axial_shape={model.get('axial_shape')})",
                    )
                cell = Cell(
                    suite.name,
                    suite.workload,
                    suite.mode,
                    suite.device,
                    suite.dtype,
                    seq_len,
                    batch,
                    tokens,
                    jsonable(model),
                    e.name,
                    jsonable(e.params),
                    label,
                    dict(suite.measure),
                )
                key = cell.key("")
                if key in seen:
                    raise locator.error(("variants", e.index), f"duplicates the cells of variants[{seen[key]}]")
                seen[key] = e.index
                cells.append(cell)
    return cells


# --------------------------------------------------------------------------- selection and estimates


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


CPU_FLOP_S = 50e9  # deliberately round guesses of achieved throughput
CUDA_FLOP_S = 100e12
PROCESS_START_S = 3.0  # spawning a subprocess and importing torch
MATMUL_PROBE_S = 1.5  # measure.matmul_rate's time budget (CPU 1.5 s, CUDA 2 s), when the suite asks for it


def _forward_flops(cell: Cell) -> float:
    m = cell.model
    b, length, d = cell.batch, cell.seq_len, m["d_model"]
    params = {k: default for k, (_, default) in variant_fields(cell.variant).items()} | cell.variant_params
    if "n_hashes" in params and "bucket_size" in params:  # LSH: each query sees ~2 buckets per hash round
        span = min(length, 2 * int(params["bucket_size"])) * int(params["n_hashes"])
    else:
        span = length / 2 if m.get("causal") else length
    attention = 8 * b * length * d * d + 4 * b * length * span * d
    if cell.workload == "attention":
        return attention
    block = attention + 4 * b * length * d * m.get("d_ff", 4 * d)
    if cell.workload == "block":
        return block
    return m.get("n_layers", 1) * block + 2 * b * length * d * m.get("vocab_size", 256)


def estimate_seconds(cell: Cell) -> float:
    """A rough a-priori wall-time guess for --dry-run: analytic FLOPs at a round throughput
    (50 GFLOP/s CPU, 100 TFLOP/s CUDA), times the iterations the measure settings imply, plus
    process start (and the matmul probe with `measure.matmul_rate`). It ignores memory-bound kernels
    and launch overhead: expect to be off by 3x."""
    flops = _forward_flops(cell) * (1 if cell.mode == "forward" else 3)  # backward ~ 2x forward
    per_iter = flops / (CUDA_FLOP_S if cell.device == "cuda" else CPU_FLOP_S)
    m = cell.measure
    # Repeats continue until both min_repeats and min_time_s are met, within the max_* caps.
    repeats = max(m["min_repeats"], m["min_time_s"] / per_iter if per_iter > 0 else m["min_repeats"])
    repeats = min(repeats, m["max_repeats"])
    measured = min(repeats * per_iter, max(m["max_time_s"], m["min_repeats"] * per_iter))
    total = PROCESS_START_S + m["warmup"] * per_iter + measured + (MATMUL_PROBE_S if m.get("matmul_rate") else 0.0)
    return float(min(total, m["timeout_s"]))
