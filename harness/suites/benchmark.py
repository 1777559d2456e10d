"""Benchmark suites: the schema of a `kind: benchmark` suite file (the default kind) and its
expansion into benchmark cells (harness.cells.benchmark).

A suite names a workload and mode, a model, a sweep (cartesian product of lists) and a list of
attention variants whose list-valued parameters expand too. `load_benchmark_suite` validates
everything up front, so a bad suite fails with a `SuiteError` pointing at the offending key
instead of a traceback halfway through a run. Use `harness.suites.load_suite`, which dispatches
on the suite's kind::

    suite = load_suite("suites/seq_length.yaml", device="cpu")
    for cell in suite.cells():
        cell.key(code_version), cell.attention_params(), cell.to_row()
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, ValidationError

from harness.cells import MODEL_ATTENTION_KEYS, NOT_MODEL_KEYS, jsonable, model_fields, variant_fields
from harness.cells.benchmark import BenchmarkCell
from harness.check.rules import CHECK_SCHEMAS, ChecksSpec
from harness.expressions import both
from harness.measurement.gpu_timers import CUDA_ONLY_TIMERS, TIMER_SETTING
from harness.store.schema import (
    AXIAL_SHAPE,
    BATCH,
    DEFAULT_MODEL_VARIANT,
    FLOAT32_MATMUL_PRECISION,
    KIND_BENCHMARK,
    MAX_SEQ_LEN,
    MODEL_VARIANT,
    SEQ_LEN,
    TOKENS_PER_BATCH,
    canonical_json,
)
from harness.suites.common import (
    MAX_SECONDS,
    MAX_THREADS,
    Device,
    KeyPath,
    Locator,
    SlurmSpec,
    Strict,
    SuiteError,
    check_cell_count,
    check_model_keys,
    check_suite_name,
    describe_fields,
    did_you_mean,
    filter_cells,
    format_path,
    merged_for_device,
    pydantic_error,
)
from harness.suites.variant_entries import VariantExpansion, expand_variants, expansion_labels
from variants.registry import type_matches, type_name

DType = Literal["float32", "float16", "bfloat16", "float64"]
Mode = Literal["forward", "forward_backward", "train_step"]
Workload = Literal["attention", "block", "model"]

SHAPE_KEYS = (SEQ_LEN, BATCH, TOKENS_PER_BATCH)


# --------------------------------------------------------------------------- schema


MAX_REPEATS = 100_000  # timed calls of one cell (each holds a sample in memory and in the row)
MAX_ROUNDS = 1000


class MeasureSpec(Strict):
    """How each cell is timed (see harness.measurement) and guarded (see harness.isolation)."""

    warmup: int = Field(2, ge=0, le=MAX_REPEATS)
    min_repeats: int = Field(5, ge=1, le=MAX_REPEATS)
    min_time_s: float = Field(1.0, ge=0, le=MAX_SECONDS)
    max_repeats: int = Field(200, ge=1, le=MAX_REPEATS)
    max_time_s: float = Field(120.0, gt=0, le=MAX_SECONDS)
    flush_l2: bool = False
    threads: Optional[int] = Field(None, ge=1, le=MAX_THREADS)
    timeout_s: float = Field(900.0, gt=0, le=MAX_SECONDS)
    memory_limit_gib: Optional[float] = Field(None, gt=0, le=2**20)  # up to 1 PiB
    skip_after_oom: bool = True
    # Measure the matmul rate (harness.measurement.matmul_rate) in each cell's process after its timing:
    # result columns matmul_gflops, matmul_n, floor_s, floor_ratio (the time over the compute floor).
    matmul_rate: bool = False
    # Contention (harness.measurement.ContentionSettings): a CPU cell while other processes kept at least
    # contention_other_cores cores busy and either its median CPU share (process CPU time / (wall x
    # threads)) was below contention_cpu_share or they kept contention_spare_busy of the cores it does
    # not use busy, or a CUDA cell beside other GPU processes or slowed clocks, is timed again after
    # contention_backoff_s seconds, at most contention_retries times, then flagged.
    contention_cpu_share: float = Field(0.85, ge=0, le=1)
    contention_other_cores: float = Field(0.25, ge=0)
    contention_spare_busy: float = Field(0.5, ge=0)
    contention_gpu_other_util_pct: float = Field(5.0, ge=0, le=100)
    contention_retries: int = Field(2, ge=0, le=100)
    contention_backoff_s: float = Field(1.0, ge=0, le=MAX_SECONDS)
    # Rounds (harness.runner): every cell measured `rounds` times, round after round over all cells
    # (rounds after the first in an order shuffled with `rounds_seed`); the cell's median is over rounds.
    rounds: int = Field(1, ge=1, le=MAX_ROUNDS)
    rounds_seed: int = 0
    # torch.set_float32_matmul_precision in each cell's process (None: torch's default, "highest").
    float32_matmul_precision: Optional[Literal["highest", "high", "medium"]] = None
    # Measure the streaming memory bandwidth (harness.measurement.measure_bandwidth, the memory roof) in
    # each cell's process after its timing: membw_gbytes_per_s and the roofline columns. Unset: with matmul_rate.
    bandwidth: Optional[bool] = None
    # How the step is timed (harness.measurement.gpu_timers): events (CUDA events / perf_counter_ns),
    # kernels (device kernel time from torch.profiler, CUDA only), graphs (CUDA graph replays, CUDA only).
    timer: Optional[Literal["events", "kernels", "graphs"]] = None


class OverrideSpec(Strict):
    """A `cpu:` / `cuda:` block: deep-merged over the suite when that device is used."""

    dtype: Optional[DType] = None
    mode: Optional[Mode] = None
    workload: Optional[Workload] = None
    model: Optional[dict[str, Any]] = None
    sweep: Optional[dict[str, Any]] = None
    variants: Optional[list[Any]] = None
    measure: Optional[dict[str, Any]] = None
    checks: Optional[dict[str, Any]] = None


class SuiteSpec(Strict):
    """The top level of a suite file."""

    name: Optional[str] = None  # defaults to the file name without extension
    kind: Literal["benchmark"] = "benchmark"
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
    checks: Optional[ChecksSpec] = None  # regression-check rules (harness.check.rules)
    slurm: Optional[SlurmSpec] = None  # Slurm resources for --executor submitit (harness.executors)


SCHEMAS: dict[KeyPath, type[BaseModel]] = {
    (): SuiteSpec,
    ("measure",): MeasureSpec,
    ("slurm",): SlurmSpec,
    ("cpu",): OverrideSpec,
    ("cuda",): OverrideSpec,
    **CHECK_SCHEMAS,
}


@dataclass
class BenchmarkSuite:
    """A validated benchmark suite; `cells()` lists its expansion."""

    kind: typing.ClassVar[str] = KIND_BENCHMARK

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
    _cells: list[BenchmarkCell] = field(default_factory=list, repr=False)
    resolved_config: dict[str, Any] = field(default_factory=dict, repr=False)  # after cpu:/cuda: and --set (load_suite)

    def cells(self) -> list[BenchmarkCell]:
        """Cells ordered by variant entry, its expansion, the other sweep keys, then seq_len ascending."""
        return list(self._cells)


def load_benchmark_suite(path: Path, data: Any, locator: Locator, device: str | None = None) -> BenchmarkSuite:
    """Validate and expand the data of a benchmark suite file (`harness.suites.load_suite` reads it);
    `device` (auto|cpu|cuda) overrides the file's. Raises SuiteError (never anything else)."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise locator.error((), f"a suite must be a mapping of keys, got {got}; required keys: sweep, variants")
    merged, resolved = merged_for_device(data, device, locator, OverrideSpec, SCHEMAS)
    try:
        spec = SuiteSpec.model_validate(merged)
    except ValidationError as error:
        raise pydantic_error(error, locator, SCHEMAS) from None

    name = check_suite_name(spec.name if spec.name is not None else path.stem, locator)
    measure = spec.measure.model_dump()
    for setting in (FLOAT32_MATMUL_PRECISION, "bandwidth", TIMER_SETTING):
        if measure[setting] is None:
            del measure[setting]  # unset: cells keep the keys they had before the setting existed
    if resolved != "cuda" and measure.get(TIMER_SETTING) in CUDA_ONLY_TIMERS:
        raise locator.error(
            ("measure", TIMER_SETTING),
            f"timer {measure[TIMER_SETTING]!r} needs a CUDA device (this suite runs on {resolved}); on CPU use 'events' (perf_counter_ns)",
        )
    if measure["min_repeats"] > measure["max_repeats"]:
        raise locator.error(
            ("measure", "max_repeats"), f"max_repeats={measure['max_repeats']} is below min_repeats={measure['min_repeats']}"
        )

    fields = model_fields()
    model = check_model_keys(spec.model, fields, locator)
    sweep = _check_sweep(spec.sweep, fields, locator)
    entries = expand_variants(spec.variants, locator, sweep)
    suite = BenchmarkSuite(
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


def _check_ratio_filters(suite: BenchmarkSuite, locator: Locator) -> None:
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
        check_cell_count(len(values), locator, ("sweep", key), f"{len(values):,} values of {key}")
        for i, value in enumerate(values):
            if key in SHAPE_KEYS:
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise locator.error(("sweep", key, i), f"{key} values must be positive integers, got {value!r}")
            elif not type_matches(value, fields[key][0]):
                raise locator.error(("sweep", key, i), f"{key} values must be {type_name(fields[key][0])}, got {value!r}")
            if value in values[:i]:
                raise locator.error(("sweep", key, i), f"duplicate value {value!r}")
    if SEQ_LEN not in sweep:
        raise locator.error(("sweep", SEQ_LEN), "required key 'seq_len' is missing (e.g. seq_len: [1024, 2048])")
    if BATCH in sweep and TOKENS_PER_BATCH in sweep:
        raise locator.error(("sweep", TOKENS_PER_BATCH), "give either batch or tokens_per_batch, not both")
    return {k: list(v) for k, v in sweep.items()}


def _mentioned(keys: typing.Iterable[str], message: str) -> str | None:
    """The first of `keys` named as a word in `message`."""
    return next((k for k in keys if re.search(rf"\b{re.escape(k)}\b", message)), None)


def _model_path(key: str | None, swept_at: dict[str, int], suite: BenchmarkSuite) -> KeyPath:
    """Where a model value came from: its sweep entry, its `model:` key, or `model` itself."""
    if key in swept_at:
        return ("sweep", key, swept_at[key])
    return ("model", key) if key in suite.model else ("model",)


def _check_model_config(
    model: dict[str, Any], e: VariantExpansion, swept_at: dict[str, int], suite: BenchmarkSuite, cache: dict[str, Any], locator: Locator
) -> Any:
    """The model's config through its own consistency check (residual/activation names,
    divisibility, ...): ReformerLMConfig, or the entry's `model_variant`'s config (a peer's own
    limits too); returns it (cached)."""
    import variants

    name = e.model_variant or DEFAULT_MODEL_VARIANT
    signature = canonical_json(["model", name, e.name, e.params, model])
    if signature in cache:
        return cache[signature]
    try:
        config = variants.make_config(name, **model, attention=e.name, attention_params={e.name: dict(e.params)})
        config.validate()
    except (ValueError, TypeError) as error:
        where = _model_path(_mentioned(model, str(error)), swept_at, suite)
        raise locator.error(where, f"invalid model settings{f' for {name}' if e.model_variant else ''}: {error}") from None
    cache[signature] = config
    return config


def _check_variant(
    e: VariantExpansion, model: dict[str, Any], swept_at: dict[str, int], suite: BenchmarkSuite, cache: dict[str, Any], locator: Locator
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


def _check_seq_len(config: Any, e: VariantExpansion, seq_len: int, where: KeyPath, locator: Locator) -> None:
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
    axial = model.get(AXIAL_SHAPE)
    return model[MAX_SEQ_LEN] if axial is None else min(model[MAX_SEQ_LEN], math.prod(axial))


def _build_cells(
    suite: BenchmarkSuite, expansions: list[VariantExpansion], fields: dict[str, tuple[Any, Any]], locator: Locator
) -> list[BenchmarkCell]:
    missing = [k for k, (_, d) in fields.items() if d is dataclasses.MISSING and k not in suite.model and k not in suite.sweep]
    if missing:
        raise locator.error(("model",), f"required model key(s) missing: {', '.join(missing)}")
    base_model = {k: d for k, (_, d) in fields.items() if d is not dataclasses.MISSING} | suite.model
    labels = expansion_labels(expansions, locator)
    other_keys = [k for k in suite.sweep if k != SEQ_LEN]
    cache: dict[str, Any] = {}
    cells: list[BenchmarkCell] = []
    seen: dict[str, int] = {}
    for e, label in zip(expansions, labels):
        # An entry's own seq_len list replaces the sweep's (e.g. the longest lengths for one variant only).
        seq_len_at: KeyPath = ("variants", e.index, SEQ_LEN) if e.seq_lens else ("sweep", SEQ_LEN)
        seq_lens = sorted(enumerate(e.seq_lens or suite.sweep[SEQ_LEN]), key=lambda iv: iv[1])
        for combo in itertools.product(*(enumerate(suite.sweep[k]) for k in other_keys)):
            chosen = {k: v for k, (_, v) in zip(other_keys, combo)}
            swept_at = {k: i for k, (i, _) in zip(other_keys, combo)}
            model = base_model | {k: v for k, v in chosen.items() if k not in SHAPE_KEYS}
            if e.model_variant is not None and suite.workload != "model":
                raise locator.error(
                    ("variants", e.index, MODEL_VARIANT),
                    f"model_variant chooses the LM of workload 'model'; this suite's is {suite.workload!r}",
                )
            model_config = _check_model_config(model, e, swept_at, suite, cache, locator)
            config = _check_variant(e, model, swept_at, suite, cache, locator)
            for j, seq_len in seq_lens:
                tokens = chosen.get(TOKENS_PER_BATCH)
                if tokens is not None:
                    if tokens % seq_len:
                        raise locator.error(
                            ("sweep", TOKENS_PER_BATCH, swept_at[TOKENS_PER_BATCH]),
                            f"tokens_per_batch={tokens} is not divisible by seq_len={seq_len} "
                            f"({format_path(locator.source(seq_len_at + (j,)))}); "
                            "use a multiple of every seq_len",
                        )
                    batch = tokens // seq_len
                else:
                    batch = chosen.get(BATCH, 1)
                _check_seq_len(config, e, seq_len, seq_len_at + (j,), locator)
                if e.model_variant is not None:
                    _check_seq_len(model_config, e, seq_len, seq_len_at + (j,), locator)
                if suite.workload == "model" and seq_len > _max_len(model):
                    raise locator.error(
                        seq_len_at + (j,),
                        f"seq_len={seq_len} exceeds what the model's positional embedding covers "
                        f"({_max_len(model)}: max_seq_len={model[MAX_SEQ_LEN]}, "
                        f"axial_shape={model.get(AXIAL_SHAPE)})",
                    )
                cell = BenchmarkCell(
                    suite.name,
                    suite.workload,
                    suite.mode,
                    suite.device,
                    suite.dtype,
                    seq_len,
                    batch,
                    tokens,
                    jsonable(model | ({MODEL_VARIANT: e.model_variant} if e.model_variant else {})),
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
