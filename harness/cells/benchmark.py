"""Benchmark cells: one measured call of a workload (an attention layer, a block stack or a whole
LM, forward / forward+backward / train step) at one shape, with one attention variant.

`BenchmarkCell.execute` (in the cell's own process) sets the thread count and the memory limit,
builds the workload, warms up, measures peak memory on one call, then times repeated calls (and,
with the suite's `measure.matmul_rate`, then measures the device's matmul rate for the compute
floor, `floor_columns`). Failures (OOM, exceptions, an unavailable variant) become its row.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import math
import os
import time
import traceback
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch

from harness import measurement as measure
from harness.cells import (
    CPU_FLOP_S,
    CUDA_FLOP_S,
    DEFAULT_MODEL_VARIANT,
    MODEL_ATTENTION_KEYS,
    MODEL_VARIANT_KEY,
    PROCESS_START_S,
    canonical_json,
    jsonable,
    model_fields,
    variant_fields,
)
from harness.environment import apply_float32_matmul_precision, device_name, optional_package_versions
from harness.isolation import default_memory_limit_bytes, start_memory_limit
from harness.safe_io import parse_json
from harness.store.schema import OPTIONAL_PACKAGES as OPTIONAL_PACKAGES_COLUMN
from harness.units import GIB, MIB
from variants.registry import VariantUnavailable

MATMUL_PROBE_S = 1.5  # measure.matmul_rate's time budget (CPU 1.5 s, CUDA 2 s), when the suite asks for it

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
            return _plain(parse_json(value))
        except ValueError:  # InputFileError too: too deep, not JSON
            return value
    return None if value is dataclasses.MISSING else value


def config_key_of(row: typing.Mapping[str, Any]) -> str:
    """Identity of a cell's configuration without the code version: what `harness check` matches a
    run's cells to a baseline's by. First 16 hex of a sha256 over the shape/variant columns, the
    parsed `variant_params` and the model columns that differ from the model's defaults (so adding a
    model field with a default keeps existing keys). Labels, suite name and measure settings are
    not part of it. Works on `BenchmarkCell.to_row()` and on stored result rows alike."""
    identity = {column: _plain(row.get(column)) for column in CONFIG_COLUMNS}
    identity["variant_params"] = _plain(row.get("variant_params")) or {}
    for name, default in model_defaults():
        if name in row and _plain(row[name]) != default:
            identity[f"model.{name}"] = _plain(row[name])
    model_variant = _plain(row.get(MODEL_VARIANT_KEY))
    if model_variant not in (None, DEFAULT_MODEL_VARIANT):  # a peer LM; ours keeps the keys it always had
        identity[f"model.{MODEL_VARIANT_KEY}"] = model_variant
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BenchmarkCell:
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

    # The cell protocol (harness.cells.Cell).

    def describe(self) -> str:
        """ "<label> L=<seq_len> B=<batch>", padded for progress lines."""
        return f"{self.label:<24} L={self.seq_len:<6} B={self.batch:<4}"

    def estimate_seconds(self) -> float:
        """`estimate_seconds(self)`: analytic FLOPs at a round throughput (seconds)."""
        return estimate_seconds(self)

    def timeout_s(self) -> float:
        """The suite's `measure.timeout_s` (seconds, default 900)."""
        return float(self.measure.get("timeout_s") or 900)

    def memory_limit_bytes(self) -> int | None:
        """On CPU the suite's `memory_limit_gib`, else `default_memory_limit_bytes()` (bytes of
        resident memory above the process's baseline); None on CUDA, where `execute` caps the
        caching allocator itself."""
        if self.device.startswith("cuda"):
            return None
        gib = self.measure.get("memory_limit_gib")
        return int(gib * GIB) if gib else default_memory_limit_bytes()

    def skip_after_failure(self) -> bool:
        """The suite's `measure.skip_after_oom` (default on)."""
        return bool(self.measure.get("skip_after_oom", True))

    def with_threads(self, threads: int) -> BenchmarkCell:
        """This cell measured with `threads` torch CPU threads."""
        return dataclasses.replace(self, measure={**self.measure, "threads": threads})

    def execute(
        self, root: str, suite: str, run_id: str, code_version: str, limit_memory: bool, report_baseline: Callable[[int], None] | None
    ) -> dict[str, Any]:
        """`measure_cell` (the run folder is not needed: the sweep stores the row)."""
        return measure_cell(self, limit_memory, report_baseline)

    def measure_rounds(self) -> int:
        """The suite's `measure.rounds`: how many rounds the sweep measures this cell in (default 1)."""
        return int(self.measure.get("rounds") or 1)

    def round_seed(self) -> int:
        """The suite's `measure.rounds_seed`: the seed of the shuffled order of rounds 2, 3, ..."""
        return int(self.measure.get("rounds_seed") or 0)

    def combine_rounds(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """`combine_rounds(rows)`: the cell's row from the ok rows of its rounds."""
        return combine_rounds(rows)

    def progress_text(self, row: dict[str, Any]) -> str:
        """ "ok <median> ms (IQR <spread>%) <peak> MiB", with NOISY when the timing was, and
        "CONTENDED <cpu share>" (or "CONTENDED <reason>" on CUDA) when it stayed contended."""
        median, iqr = row.get("time_ms_median", math.nan), row.get("time_ms_iqr", math.nan)
        spread = 100 * iqr / median if median else 0.0
        noisy = " NOISY" if row.get("time_noisy") else ""
        text = f"ok  {median:10.2f} ms (IQR {spread:4.1f}%{noisy})  {row.get('peak_mem_mib', math.nan):9.1f} MiB"
        return text + contention_text(row)


def contention_text(row: Mapping[str, Any]) -> str:
    """ " CONTENDED 0.51" (the CPU share) or " CONTENDED (<reason>)" for a contended row, with the
    re-measurements it took; "" otherwise."""
    if not row.get("contended"):
        return ""
    share = row.get("cpu_share")
    retries = int(row.get("contention_retries_used") or 0)
    after = f" after {retries} re-measurement{'s' if retries > 1 else ''}" if retries else ""
    if isinstance(share, (int, float)) and math.isfinite(share):
        return f"  CONTENDED {share:.2f}{after}"
    return f"  CONTENDED ({str(row.get('contention') or '')[:80]}){after}"


def _numbers(rows: list[dict[str, Any]], column: str) -> list[float]:
    """The finite values of `column` in `rows`."""
    values = [row.get(column) for row in rows]
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _union(rows: list[dict[str, Any]], column: str) -> list[float] | None:
    """The list columns `column` of `rows` concatenated in round order; None when a round lacks it."""
    lists = [_plain(row.get(column)) for row in rows]
    if any(not isinstance(values, list) for values in lists):
        return None
    return [float(v) for values in lists for v in values]


def combine_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of a cell measured in rounds (`measure.rounds`), from the ok rows of its rounds in
    round order (docs/architecture.md, "Rounds"):

    - samples (`time_ms_samples`, `cpu_time_ms_samples`, `cpu_share_samples`) are the union, and the
      spread columns (`time_ms_iqr`, min, max, mean, `time_noisy`) are those of the union;
    - `time_ms_median` is the median of the round medians (`round_medians_ms`, ms); `round_drift` =
      max / min of the round medians - 1; `rounds` the number of rounds;
    - `contended` when any round stayed contended, `contention` its reasons ("round 2: ...");
      `contention_retries_used` summed; the machine-load columns the worst round's;
    - peak memory and the matmul rate: medians over the rounds; throughput, `tflops_per_s` and the
      floor columns from the combined median; `cell_wall_s` summed, `started_at` the first round's.
    """
    first, last = rows[0], rows[-1]
    out = {k: v for k, v in last.items() if k not in ("row_type", "round")}
    samples = _union(rows, "time_ms_samples") or []
    cpu = _union(rows, "cpu_time_ms_samples")
    out.update(measure.Timing(samples, timer=str(last.get("timer") or "perf_counter_ns"), cpu_samples_ms=cpu).as_row())
    medians = _numbers(rows, "time_ms_median")
    median = measure.median_of(medians)
    out.update(
        time_ms_median=median,
        round_medians_ms=medians,
        round_drift=max(medians) / min(medians) - 1 if medians and min(medians) > 0 else math.nan,
        rounds=len(rows),
        started_at=first.get("started_at"),
        cell_wall_s=sum(_numbers(rows, "cell_wall_s")),
        message=next((str(r["message"]) for r in reversed(rows) if r.get("message")), ""),
    )
    shares = _union(rows, "cpu_share_samples")
    if shares is not None:
        out.update(cpu_share_samples=shares, cpu_share=measure.median_of(shares))
    contended = [r for r in rows if r.get("contended")]
    out.update(
        contended=bool(contended),
        contention="; ".join(f"round {r.get('round')}: {r.get('contention')}" for r in contended),
        contention_retries_used=int(sum(_numbers(rows, "contention_retries_used"))),
    )
    worst = max(rows, key=lambda r: _numbers([r], "other_cpu_cores") or [-1.0])
    for column in ("other_cpu_cores", "other_busy_processes", "load_avg_1m"):
        if column in worst:
            out[column] = worst[column]
    for column in ("gpu_other_processes", "gpu_other_sm_util_pct"):
        if _numbers(rows, column):
            out[column] = max(_numbers(rows, column))
    for column in ("peak_mem_mib", "activation_mem_mib", "peak_reserved_mib", "matmul_gflops"):
        if _numbers(rows, column):
            out[column] = measure.median_of(_numbers(rows, column))
    seconds = median / 1e3
    last_seconds = float(last.get("time_ms_median") or math.nan) / 1e3
    if _numbers([last], "tokens_per_s") and seconds > 0:
        out["tokens_per_s"] = float(last["tokens_per_s"]) * last_seconds / seconds
    if _numbers([last], "flops") and seconds > 0:
        out["tflops_per_s"] = float(last["flops"]) / seconds / 1e12
    out.update(floor_columns(out))
    return out


# --------------------------------------------------------------------------- estimates


def _forward_flops(cell: BenchmarkCell) -> float:
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


def estimate_seconds(cell: BenchmarkCell) -> float:
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


# --------------------------------------------------------------------------- measuring, in the cell process


def _limit_cuda_memory(cell: BenchmarkCell, device: torch.device) -> int | None:
    """Cap the caching allocator at the suite's `memory_limit_gib` (only when set); bytes or None.

    RLIMIT_AS cannot be used with CUDA: the driver reserves far more address space than memory.
    """
    gib = cell.measure.get("memory_limit_gib")
    if not gib:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), device)
    return int(min(gib * GIB, total))


def measure_cell(cell: BenchmarkCell, limit_memory: bool = True, report_baseline: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Build and measure one cell in this process; return its metric columns (status included).

    With `limit_memory` on CPU, `report_baseline(rss_bytes)` is called once the address-space
    backstop is set: the resident memory the parent's watch counts the limit from.

    Exceptions (out-of-memory included) become `oom` / `error` rows; KeyboardInterrupt and
    SystemExit propagate so an interrupted in-process run stops.
    """
    from harness.workloads import build_workload  # imports torch-heavy variants lazily

    row: dict[str, Any] = {}
    began = time.monotonic()
    try:
        device = torch.device(cell.device)
        row["threads"] = measure.set_cpu_threads(cell.measure.get("threads"))
        row.update(apply_float32_matmul_precision(cell.measure.get("float32_matmul_precision")))
        row["device_name"] = device_name(cell.device)
        limit = None
        if device.type == "cuda":
            row.update({f"nvml_before_{k}": v for k, v in measure.nvml_snapshot(device.index or 0).items()})
            if limit_memory:
                limit = _limit_cuda_memory(cell, device)
        elif limit_memory:
            limit = cell.memory_limit_bytes()
            start_memory_limit(limit, report_baseline)
        if limit is not None:
            row["memory_limit_mib"] = limit / MIB
        workload = build_workload(cell, device)
        settings = measure.TimingSettings(
            **{k: cell.measure[k] for k in ("warmup", "min_repeats", "min_time_s", "max_repeats", "max_time_s", "flush_l2")}
        )
        # On CPU the memory step and its warm-up run with freed memory returned to the OS (else VmHWM
        # counts re-touched heap holes); timing then gets its own warm-up under the usual thresholds.
        with measure.freed_memory_returned() if device.type == "cpu" else nullcontext():
            for _ in range(settings.warmup):
                workload.step()
            memory = measure.measure_peak_memory(workload.step, device)
        if device.type == "cpu":
            for _ in range(settings.warmup):
                workload.step()
        timing, contention = measure.time_watched(
            workload.step,
            device,
            replace(settings, warmup=0),
            measure.ContentionSettings.from_measure(cell.measure),
            deadline=_retry_deadline(cell, began),
            family_of=os.getppid() if limit_memory else None,  # its own process: the sweep's other cells are the run's own load
        )
    except VariantUnavailable as error:  # not applicable here (missing optional package, no kernel)
        return {**row, "status": "skipped", "message": f"variant unavailable: {error}"[:4000]}
    except Exception as error:  # every failure becomes data
        status = "oom" if measure.is_oom_error(error) else "error"
        message = f"{type(error).__name__}: {error}"
        if status == "oom" and "memory_limit_mib" in row:
            message += f" (memory limit {row['memory_limit_mib'] / 1024:.3g} GiB)"
        if status == "error":
            message += "\n" + "".join(traceback.format_exception(error)[-3:])
        return {**row, "status": status, "message": message[:4000]}
    seconds = timing.median_ms / 1000
    row.update(timing.as_row())
    row.update(contention)
    row.update(memory.as_row())
    row.update(workload.state_memory_mib(), activation_mem_mib=memory.peak_mib)  # the memory breakdown
    row.update(workload.attention_backends())
    row.update(
        status="ok",
        message="",
        flops=workload.flops,
        tokens_per_s=workload.tokens / seconds if seconds > 0 else math.nan,
        tflops_per_s=workload.flops / seconds / 1e12 if seconds > 0 else math.nan,
        n_params=sum(p.numel() for p in workload.module.parameters()),
    )
    row[OPTIONAL_PACKAGES_COLUMN] = canonical_json(optional_package_versions(imported_only=True))  # what this cell imported
    if device.type == "cuda":  # the clocks right after the timing, before any matmul probe
        row.update({f"nvml_after_{k}": v for k, v in measure.nvml_snapshot(device.index or 0).items()})
    if cell.measure.get("matmul_rate"):
        del workload  # its memory is released first, so the probe cannot run out of it
        row.update(_probe_matmul(cell, device))
        row.update(floor_columns(row))
    return row


def _retry_deadline(cell: BenchmarkCell, began: float) -> float:
    """time.monotonic() after which a contended cell is not timed again: 80% of its timeout (counted
    from its process start, about PROCESS_START_S before `began`), less the matmul probe's budget."""
    probe = MATMUL_PROBE_S if cell.measure.get("matmul_rate") else 0.0
    return began - PROCESS_START_S + 0.8 * cell.timeout_s() - probe


def _probe_matmul(cell: BenchmarkCell, device: torch.device) -> dict[str, Any]:
    """`matmul_gflops` / `matmul_n` of `measure.measure_matmul` in the cell's dtype, measured right
    after the cell's timing; a failed probe leaves the cell ok, with NaN and the reason in `message`."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        measure.release_free_heap()
    try:
        return measure.measure_matmul(device, cell.dtype).as_row()
    except Exception as error:  # e.g. out of memory under a tight memory_limit_gib
        return {"matmul_gflops": math.nan, "matmul_n": None, "message": f"matmul_rate probe failed: {type(error).__name__}: {error}"[:4000]}


def floor_columns(row: Mapping[str, Any]) -> dict[str, float]:
    """The compute-floor columns of a result row that has `matmul_gflops` (else {}), the one place
    they are defined:

    - `floor_s` = flops / (matmul_gflops * 1e9): seconds the cell's analytic FLOPs (forward, plus
      2x those with a backward, `workloads.step_flops`) would take at the measured matmul rate;
    - `floor_ratio` = (time_ms_median / 1e3) / floor_s: the median time per step over that floor
      (1 = the step runs at the matmul rate; a target "within 1.5x of the floor" is floor_ratio <= 1.5).

    NaN where an input is missing, not finite or not positive.
    """
    if "matmul_gflops" not in row:
        return {}

    def number(key: str) -> float:
        value = row.get(key)
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return math.nan
        return value if math.isfinite(value) and value > 0 else math.nan

    flops, gflops, median_ms = number("flops"), number("matmul_gflops"), number("time_ms_median")
    floor_s = flops / (gflops * 1e9)
    return {"floor_s": floor_s, "floor_ratio": median_ms / 1e3 / floor_s}
