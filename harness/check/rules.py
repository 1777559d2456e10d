"""The `checks:` block of a suite (and of a `--checks` file): which regressions `harness check` looks for.

Every rule has `enabled` and defaults that follow shared/reference/measurement.md::

    checks:
      time: {threshold: 0.10, p_value: 0.01}        # slower by >= 10% AND Mann-Whitney p < 0.01
      memory: {threshold: 0.02, floor_mib: 1.0}     # peak memory up by > max(2%, 1 MiB)
      bpd: {threshold: 0.01, columns: [eval_bpd, bpd]}  # bits per dim up by > 0.01 (absolute)
      status: {enabled: true}                       # ok -> oom/error/timeout, always
      ratios:                                       # time ratios measured within one run
        - numerator: "variant_label == 'lsh n_hashes=8'"
          denominator: "variant_label == 'full'"
          at: "seq_len == 2048"                     # optional extra filter for both sides
          threshold: 0.25                           # ratio up by >= 25% AND p < p_value
          metric: cpu_time                          # per-repeat process CPU time instead of wall time
      targets:                                      # absolute bounds within one run (check --targets)
        - name: "LSH-8 3x faster than the fastest peer at 16K"
          numerator: "variant == 'lsh' and n_hashes == 8"
          denominator: "variant in ['hf_lsh', 'reformer_pytorch_lsh'] and n_hashes == 8"
          match_on: [seq_len, batch, n_hashes]
          at: "seq_len == 16384"
          max: 0.3333

A ratio pairs each numerator cell with the one denominator cell that agrees on `match_on`
(default seq_len and batch) and compares median(numerator) / median(denominator) with the same
ratio in the baseline. Expressions are those of harness.expressions, checked when the block is read.
This module has no torch/pandas imports: harness.suites validates with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.analysis.stats import NOISE_ALPHA
from harness.expressions import parse_expression
from harness.safe_yaml import YAMLInputError, load_yaml, read_yaml_text
from harness.store.schema import (
    BACKWARD_MS_SAMPLES,
    BATCH,
    BPD,
    CPU_TIME_MS_SAMPLES,
    EVAL_BPD,
    FLOOR_RATIO,
    FORWARD_MS_SAMPLES,
    SEQ_LEN,
    TIME_MS_SAMPLES,
)


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool = True


def _expression(value: str | None) -> str | None:
    """Whitelist-check a selection expression (harness.expressions) when the rules are read, so a
    suite, checks file or stored run with code in an expression is rejected before anything runs."""
    if value is not None:
        parse_expression(value)
    return value


class TimeRule(_Rule):
    """Absolute time: slower by at least `threshold` (relative) and significant on the samples."""

    threshold: float = Field(0.10, gt=0)
    p_value: float = Field(NOISE_ALPHA, gt=0, le=1)


class MemoryRule(_Rule):
    """Peak memory: the change must exceed both `threshold` x baseline and `floor_mib`."""

    threshold: float = Field(0.02, ge=0)
    floor_mib: float = Field(1.0, ge=0)


class BpdRule(_Rule):
    """Bits per dim (lower is better): the first of `columns` present in both runs, absolute threshold."""

    threshold: float = Field(0.01, ge=0)
    columns: list[str] = Field(default_factory=lambda: [EVAL_BPD, BPD], min_length=1)


class StatusRule(_Rule):
    """A status change (ok -> oom/error/timeout, or between failures) is a regression."""


class RatioRule(_Rule):
    """median time of `numerator` cells / median time of the matching `denominator` cell.

    metric "time" uses the wall-time samples (`time_ms_samples`); "cpu_time" the process CPU time
    of each repeat (`cpu_time_ms_samples`, CPU cells only), which other processes on a shared
    machine barely move; "forward_time" / "backward_time" one phase of each repeat
    (`forward_ms_samples` / `backward_ms_samples`, cells that timed their phases apart).
    """

    numerator: str = Field(min_length=1)
    denominator: str = Field(min_length=1)
    at: Optional[str] = None
    match_on: list[str] = Field(default_factory=lambda: [SEQ_LEN, BATCH])
    name: Optional[str] = None
    metric: Literal["time", "cpu_time", "forward_time", "backward_time"] = "time"
    threshold: float = Field(0.10, gt=0)
    p_value: float = Field(NOISE_ALPHA, gt=0, le=1)

    _expressions = field_validator("numerator", "denominator", "at")(_expression)


RATIO_SAMPLES = {
    "time": TIME_MS_SAMPLES,
    "cpu_time": CPU_TIME_MS_SAMPLES,
    "forward_time": FORWARD_MS_SAMPLES,
    "backward_time": BACKWARD_MS_SAMPLES,
}


class TargetRule(_Rule):
    """An absolute bound within one run, no baseline (`harness check RUN --targets`).

    value = metric of each `numerator` cell, divided (when `denominator` is given) by the metric of
    the matching denominator cell (same `match_on` columns; of several ok ones, the fastest: "the
    fastest peer"). The target holds when every value is <= `max` (and >= `min`). Metrics: time
    (median s per step), forward_time / backward_time (median s of that phase), peak_mem (MiB, the step's peak above
    what was allocated before it),
    activation_mem (MiB, `activation_mem_mib`: the peak above parameters, gradients and optimizer
    state; the same number as peak_mem for a step measured from its steady state), floor_ratio (time over the compute floor),
    time_per_token (median s / (seq_len * batch)), bpd (a quality run's final eval bits per dim, per
    evaluation: `harness.analysis.pairing.comparable_rows`; match it on seq_len alone, quality rows have no batch).
    """

    name: Optional[str] = None
    numerator: str = Field(min_length=1)
    denominator: Optional[str] = None
    at: Optional[str] = None
    match_on: list[str] = Field(default_factory=lambda: [SEQ_LEN, BATCH])
    metric: Literal["time", "forward_time", "backward_time", "peak_mem", "activation_mem", FLOOR_RATIO, "time_per_token", BPD] = "time"
    max: Optional[float] = None
    min: Optional[float] = None

    _expressions = field_validator("numerator", "denominator", "at")(_expression)


_RULES = (TimeRule, MemoryRule, BpdRule, StatusRule)


class ChecksSpec(BaseModel):
    """The whole `checks:` block."""

    model_config = ConfigDict(extra="forbid", strict=True)

    time: TimeRule = TimeRule()
    memory: MemoryRule = MemoryRule()
    bpd: BpdRule = BpdRule()
    status: StatusRule = StatusRule()
    ratios: list[RatioRule] = []
    targets: list[TargetRule] = []


# The schema of each mapping of the block, by key path (the per-metric rules: time, memory, bpd, status).
CHECK_SCHEMAS: dict[tuple, type[BaseModel]] = {
    ("checks",): ChecksSpec,
    **{("checks", name): field.annotation for name, field in ChecksSpec.model_fields.items() if field.annotation in _RULES},
}


class ChecksError(Exception):
    """An invalid checks block or file; str is a human message."""


def _first_error(error: ValidationError, where: str) -> ChecksError:
    first = error.errors()[0]
    path = ".".join(str(p) for p in ("checks", *first["loc"]))
    if first["type"] == "extra_forbidden":
        schema = CHECK_SCHEMAS.get(("checks", *first["loc"][:-1]), TargetRule if first["loc"][0] == "targets" else RatioRule)
        problem = f"unknown key {first['loc'][-1]!r}; allowed keys: {', '.join(schema.model_fields)}"
    elif first["type"] == "value_error":  # a validator's own message (e.g. an expression outside the language)
        problem = first["msg"].removeprefix("Value error, ")
    else:
        problem = f"{first['msg']}, got {first.get('input')!r}"
    return ChecksError(f"{where}: {path}: {problem}")


def parse_checks(data: Any, where: str = "checks") -> ChecksSpec:
    """Validate a checks mapping (None -> all defaults); raise ChecksError naming `where`."""
    if data is None:
        return ChecksSpec()
    if not isinstance(data, dict):
        raise ChecksError(f"{where}: checks must be a mapping, got {type(data).__name__}")
    try:
        return ChecksSpec.model_validate(data)
    except ValidationError as error:
        raise _first_error(error, where) from None


def checks_from_suite_text(text: str, device: str, where: str = "the suite's text") -> ChecksSpec | None:
    """The checks of a suite's YAML text for `device` (cpu/cuda): `checks:` deep-merged with the
    device block's `checks:` (mappings merge, anything else, e.g. the ratios list, replaces).
    None when the suite has no checks block at all."""
    try:
        data = load_yaml(text, where) or {}
    except YAMLInputError as error:
        raise ChecksError(str(error)) from None
    if not isinstance(data, dict):
        return None
    device_block = data.get(device) if isinstance(data.get(device), dict) else {}
    if data.get("checks") is None and device_block.get("checks") is None:
        return None
    merged = _merge(data.get("checks") or {}, device_block.get("checks") or {})
    return parse_checks(merged, where)


def load_checks_file(path: str | Path) -> ChecksSpec:
    """A `--checks` YAML file: either the block itself or a mapping with a `checks:` key."""
    path = Path(path)
    try:
        data = load_yaml(read_yaml_text(path, "checks file"), path)
    except YAMLInputError as error:
        raise ChecksError(str(error)) from None
    if isinstance(data, dict) and set(data) == {"checks"}:
        data = data["checks"]
    return parse_checks(data, str(path))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
