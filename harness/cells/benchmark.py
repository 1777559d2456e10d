"""Benchmark cells: one measured call of a workload (an attention layer, a block stack or a whole
LM, forward / forward+backward / train step) at one shape, with one attention variant.

`BenchmarkCell.execute` (in the cell's own process) sets the thread count and the memory limit,
builds the workload, warms up, measures peak memory on one call, then times repeated calls (and,
with the suite's `measure.matmul_rate`, then measures the device's matmul rate for the compute
floor, `floor_columns`). Failures (OOM, exceptions, an unavailable variant) become its row.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import math
import os
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch

from harness import measurement
from harness.cells import CPU_FLOP_S, CUDA_FLOP_S, MODEL_ATTENTION_KEYS, PROCESS_START_S, jsonable, variant_fields
from harness.cells.benchmark_rows import combine_rounds, floor_columns, roofline_columns
from harness.environment import apply_float32_matmul_precision, device_name, optional_package_versions
from harness.isolation import default_memory_limit_bytes, start_memory_limit
from harness.store.schema import (
    ACTIVATION_MEM_MIB,
    BATCH,
    CAUSAL,
    CODE_VERSION,
    CONFIG_KEY,
    CONTENDED,
    CONTENTION,
    CONTENTION_RETRIES_USED,
    CPU_SHARE,
    D_FF,
    D_MODEL,
    DEVICE,
    DEVICE_NAME,
    DTYPE,
    FLOAT32_MATMUL_PRECISION,
    FLOPS,
    MATMUL_GFLOPS,
    MATMUL_N,
    MEMBW_GBYTES_PER_S,
    MEMBW_MIB,
    MEMORY_LIMIT_MIB,
    MESSAGE,
    MODE,
    N_LAYERS,
    N_PARAMS,
    NVML_AFTER_PREFIX,
    NVML_BEFORE_PREFIX,
    OPTIONAL_PACKAGES,
    PEAK_MEM_MIB,
    ROUNDS,
    SEQ_LEN,
    STATUS,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_OOM,
    STATUS_SKIPPED,
    TFLOPS_PER_S,
    THREADS,
    TIME_MS_IQR,
    TIME_MS_MEDIAN,
    TIME_NOISY,
    TOKENS_PER_BATCH,
    TOKENS_PER_S,
    VARIANT,
    VARIANT_LABEL,
    VARIANT_PARAM_PREFIX,
    VARIANT_PARAMS,
    VOCAB_SIZE,
    WORKLOAD,
    canonical_json,
    config_key,
)
from harness.units import GIB, MIB
from variants.registry import VariantUnavailable

MATMUL_PROBE_S = 1.5  # measure.matmul_rate's time budget (CPU 1.5 s, CUDA 2 s), when the suite asks for it
BANDWIDTH_PROBE_S = 1.5  # measure.bandwidth's probe: buffers filled, one warm-up and up to 1 s of triads


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
        payload = canonical_json({"config": self.config_dict(), CODE_VERSION: code_version})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def group_key(self) -> str:
        """The key of this cell's configuration without its length: cells differing only in seq_len
        (and in batch when it is derived from tokens_per_batch) share it."""
        config = self.config_dict()
        config.pop(SEQ_LEN)
        if self.tokens_per_batch is not None:
            config.pop(BATCH)
        return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]

    def config_key(self) -> str:
        """`harness.store.schema.config_key(self.to_row())`: the configuration identity without the code version."""
        return self.to_row()[CONFIG_KEY]

    def attention_params(self) -> dict[str, Any]:
        """Keyword arguments for `variants.build(cell.variant, **...)`."""
        return {key: self.model[key] for key in MODEL_ATTENTION_KEYS} | dict(self.variant_params)

    def to_row(self) -> dict[str, Any]:
        """Flat result-row columns (docs/architecture.md): shapes, model keys, variant and its params."""
        row: dict[str, Any] = {
            WORKLOAD: self.workload,
            MODE: self.mode,
            DEVICE: self.device,
            DTYPE: self.dtype,
            SEQ_LEN: self.seq_len,
            BATCH: self.batch,
            TOKENS_PER_BATCH: self.tokens_per_batch,
        }
        row.update(jsonable(self.model))
        row.update({VARIANT: self.variant, VARIANT_LABEL: self.label, VARIANT_PARAMS: canonical_json(self.variant_params)})
        for name, value in jsonable(self.variant_params).items():
            # A variant parameter named like a model column (e.g. dropout) gets a prefix.
            column = name if name not in row else VARIANT_PARAM_PREFIX + name
            if column not in row:
                row[column] = value
        row[CONFIG_KEY] = config_key(row)
        return row

    # The cell protocol (harness.cells.Cell).

    def describe(self) -> str:
        """ "<label> L=<seq_len> B=<batch>", padded for progress lines."""
        return f"{self.label:<24} L={self.seq_len:<6} B={self.batch:<4}"

    def estimate_seconds(self) -> float:
        """`estimate_seconds(self)`: analytic FLOPs at a round throughput (seconds)."""
        return estimate_seconds(self)

    def measures_bandwidth(self) -> bool:
        """The suite's `measure.bandwidth`; unset (None), the same as `measure.matmul_rate`: the two roofs together."""
        setting = self.measure.get("bandwidth")
        return bool(self.measure.get("matmul_rate")) if setting is None else bool(setting)

    def timer(self) -> str:
        """The suite's `measure.timer` (harness.measurement.TIMERS); "events" when unset."""
        return str(self.measure.get(measurement.TIMER_SETTING) or "events")

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
        return dataclasses.replace(self, measure={**self.measure, THREADS: threads})

    def execute(
        self, root: str, suite: str, run_id: str, code_version: str, limit_memory: bool, report_baseline: Callable[[int], None] | None
    ) -> dict[str, Any]:
        """`measure_cell` (the run folder is not needed: the runner stores the row)."""
        return measure_cell(self, limit_memory, report_baseline)

    def measure_rounds(self) -> int:
        """The suite's `measure.rounds`: how many rounds the runner measures this cell in (default 1)."""
        return int(self.measure.get(ROUNDS) or 1)

    def round_seed(self) -> int:
        """The suite's `measure.rounds_seed`: the seed of the shuffled order of rounds 2, 3, ..."""
        return int(self.measure.get("rounds_seed") or 0)

    def combine_rounds(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """`combine_rounds(rows)`: the cell's row from the ok rows of its rounds."""
        return combine_rounds(rows)

    def progress_text(self, row: dict[str, Any]) -> str:
        """ "ok <median> ms (IQR <spread>%) <peak> MiB", with NOISY when the timing was, and
        "CONTENDED <cpu share>" (or "CONTENDED <reason>" on CUDA) when it stayed contended."""
        median, iqr = row.get(TIME_MS_MEDIAN, math.nan), row.get(TIME_MS_IQR, math.nan)
        spread = 100 * iqr / median if median else 0.0
        noisy = " NOISY" if row.get(TIME_NOISY) else ""
        text = f"ok  {median:10.2f} ms (IQR {spread:4.1f}%{noisy})  {row.get(PEAK_MEM_MIB, math.nan):9.1f} MiB"
        return text + contention_text(row)


def contention_text(row: Mapping[str, Any]) -> str:
    """ " CONTENDED 0.51" (the CPU share) or " CONTENDED (<reason>)" for a contended row, with the
    re-measurements it took; "" otherwise."""
    if not row.get(CONTENDED):
        return ""
    share = row.get(CPU_SHARE)
    retries = int(row.get(CONTENTION_RETRIES_USED) or 0)
    after = f" after {retries} re-measurement{'s' if retries > 1 else ''}" if retries else ""
    if isinstance(share, (int, float)) and math.isfinite(share):
        return f"  CONTENDED {share:.2f}{after}"
    return f"  CONTENDED ({str(row.get(CONTENTION) or '')[:80]}){after}"


# --------------------------------------------------------------------------- estimates


def _forward_flops(cell: BenchmarkCell) -> float:
    m = cell.model
    b, length, d = cell.batch, cell.seq_len, m[D_MODEL]
    params = {k: default for k, (_, default) in variant_fields(cell.variant).items()} | cell.variant_params
    if "n_hashes" in params and "bucket_size" in params:  # LSH: each query sees ~2 buckets per hash round
        span = min(length, 2 * int(params["bucket_size"])) * int(params["n_hashes"])
    else:
        span = length / 2 if m.get(CAUSAL) else length
    attention = 8 * b * length * d * d + 4 * b * length * span * d
    if cell.workload == "attention":
        return attention
    block = attention + 4 * b * length * d * m.get(D_FF, 4 * d)
    if cell.workload == "block":
        return block
    return m.get(N_LAYERS, 1) * block + 2 * b * length * d * m.get(VOCAB_SIZE, 256)


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
    probes = (MATMUL_PROBE_S if m.get("matmul_rate") else 0.0) + (BANDWIDTH_PROBE_S if cell.measures_bandwidth() else 0.0)
    total = PROCESS_START_S + m["warmup"] * per_iter + measured + probes
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
        row[THREADS] = measurement.set_cpu_threads(cell.measure.get(THREADS))
        row.update(apply_float32_matmul_precision(cell.measure.get(FLOAT32_MATMUL_PRECISION)))
        row[DEVICE_NAME] = device_name(cell.device)
        limit = None
        if device.type == "cuda":
            row.update({NVML_BEFORE_PREFIX + k: v for k, v in measurement.nvml_snapshot(device.index or 0).items()})
            if limit_memory:
                limit = _limit_cuda_memory(cell, device)
        elif limit_memory:
            limit = cell.memory_limit_bytes()
            start_memory_limit(limit, report_baseline)
        if limit is not None:
            row[MEMORY_LIMIT_MIB] = limit / MIB
        workload = build_workload(cell, device)
        settings = measurement.TimingSettings(
            **{k: cell.measure[k] for k in ("warmup", "min_repeats", "min_time_s", "max_repeats", "max_time_s", "flush_l2")}
        )
        # On CPU the memory step and its warm-up run with freed memory returned to the OS (else VmHWM
        # counts re-touched heap holes); timing then gets its own warm-up under the usual thresholds.
        with measurement.freed_memory_returned() if device.type == "cpu" else nullcontext():
            for _ in range(settings.warmup):
                workload.step()
            memory = measurement.measure_peak_memory(workload.step, device)
        if device.type == "cpu":
            for _ in range(settings.warmup):
                workload.step()
        timed = dict(
            deadline=_retry_deadline(cell, began),
            family_of=os.getppid() if limit_memory else None,  # its own process: the runner's other cells are the run's own load
        )
        contention_settings = measurement.ContentionSettings.from_measure(cell.measure)
        try:
            timing, contention = measurement.time_watched(
                workload.step, device, replace(settings, warmup=0), contention_settings, timer=cell.timer(), **timed
            )
        except measurement.GraphCaptureError as error:  # measure.timer graphs: not capturable, so timed with events
            row[MESSAGE] = f"timer graphs: {error}; timed with CUDA events instead"[:4000]
            timing, contention = measurement.time_watched(workload.step, device, replace(settings, warmup=0), contention_settings, **timed)
    except VariantUnavailable as error:  # not applicable here (missing optional package, no kernel)
        return {**row, STATUS: STATUS_SKIPPED, MESSAGE: f"variant unavailable: {error}"[:4000]}
    except Exception as error:  # every failure becomes data
        status = STATUS_OOM if measurement.is_oom_error(error) else STATUS_ERROR
        message = f"{type(error).__name__}: {error}"
        if status == STATUS_OOM and MEMORY_LIMIT_MIB in row:
            message += f" (memory limit {row[MEMORY_LIMIT_MIB] / 1024:.3g} GiB)"
        if status == STATUS_ERROR:
            message += "\n" + "".join(traceback.format_exception(error)[-3:])
        return {**row, STATUS: status, MESSAGE: message[:4000]}
    seconds = timing.median_ms / 1000
    row.update(timing.as_row())
    row.update(contention)
    row.update(memory.as_row())
    row.update(workload.state_memory_mib(), **{ACTIVATION_MEM_MIB: memory.peak_mib})  # the memory breakdown
    row.update(workload.attention_backends())
    row.update(workload.phase_columns())
    row.update(
        {
            STATUS: STATUS_OK,
            MESSAGE: row.get(MESSAGE, ""),
            FLOPS: workload.flops,
            TOKENS_PER_S: workload.tokens / seconds if seconds > 0 else math.nan,
            TFLOPS_PER_S: workload.flops / seconds / 1e12 if seconds > 0 else math.nan,
            N_PARAMS: sum(p.numel() for p in workload.module.parameters()),
        }
    )
    row[OPTIONAL_PACKAGES] = canonical_json(optional_package_versions(imported_only=True))  # what this cell imported
    if device.type == "cuda":  # the clocks right after the timing, before any matmul probe
        row.update({NVML_AFTER_PREFIX + k: v for k, v in measurement.nvml_snapshot(device.index or 0).items()})
    del workload  # its memory is released first, so the probes cannot run out of it
    if cell.measure.get("matmul_rate"):
        row.update(
            _probe_roof(
                device, "matmul_rate", lambda: measurement.measure_matmul(device, cell.dtype), {MATMUL_GFLOPS: math.nan, MATMUL_N: None}
            )
        )
        row.update(floor_columns(row))
    if cell.measures_bandwidth():
        row.update(
            _probe_roof(
                device,
                "bandwidth",
                lambda: measurement.measure_bandwidth(device, cell.dtype),
                {MEMBW_GBYTES_PER_S: math.nan, MEMBW_MIB: None},
            )
        )
    row.update(roofline_columns(row))
    return row


def _retry_deadline(cell: BenchmarkCell, began: float) -> float:
    """time.monotonic() after which a contended cell is not timed again: 80% of its timeout (counted
    from its process start, about PROCESS_START_S before `began`), less the matmul probe's budget."""
    probe = (MATMUL_PROBE_S if cell.measure.get("matmul_rate") else 0.0) + (BANDWIDTH_PROBE_S if cell.measures_bandwidth() else 0.0)
    return began - PROCESS_START_S + 0.8 * cell.timeout_s() - probe


def _probe_roof(device: torch.device, what: str, probe: Callable[[], Any], failed: dict[str, Any]) -> dict[str, Any]:
    """One roof of the cell's device, measured right after its timing with the workload's memory
    released first: `probe()` (`measurement.measure_matmul` -> `matmul_gflops` / `matmul_n`, or
    `measurement.measure_bandwidth` -> `membw_gbytes_per_s` / `membw_mib`) as row columns. A failed
    probe leaves the cell ok: the `failed` columns (NaN) and the reason in `message`."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        measurement.release_free_heap()
    try:
        return probe().as_row()
    except Exception as error:  # e.g. out of memory under a tight memory_limit_gib
        return {**failed, MESSAGE: f"{what} probe failed: {type(error).__name__}: {error}"[:4000]}
