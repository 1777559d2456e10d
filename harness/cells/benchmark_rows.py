"""A benchmark cell's derived columns: the compute floor (`floor_columns`), the roofline
(`roofline_columns`) and, for a cell measured in rounds, its row combined from the rows of its
rounds (`combine_rounds`)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from harness import measurement
from harness.store.schema import (
    ACTIVATION_MEM_MIB,
    BOUND,
    BYTES,
    CELL_WALL_S,
    COMPUTE_FRACTION,
    CONTENDED,
    CONTENTION,
    CONTENTION_RETRIES_USED,
    CPU_SHARE,
    CPU_SHARE_SAMPLES,
    CPU_TIME_MS_SAMPLES,
    FLOOR_RATIO,
    FLOOR_S,
    FLOPS,
    GBYTES_PER_S,
    GPU_OTHER_PROCESSES,
    GPU_OTHER_SM_UTIL_PCT,
    INTENSITY,
    LOAD_AVG_1M,
    MATMUL_GFLOPS,
    MEMBW_GBYTES_PER_S,
    MEMORY_FRACTION,
    MESSAGE,
    OTHER_BUSY_PROCESSES,
    OTHER_CPU_CORES,
    PEAK_MEM_MIB,
    PEAK_RESERVED_MIB,
    ROOF_FRACTION,
    ROUND,
    ROUND_DRIFT,
    ROUND_MEDIANS_MS,
    ROUNDS,
    ROW_TYPE,
    STARTED_AT,
    TFLOPS_PER_S,
    TIME_MS_MEDIAN,
    TIME_MS_SAMPLES,
    TIMER,
    TOKENS_PER_S,
    plain_value,
)


def numbers_of(rows: list[dict[str, Any]], column: str) -> list[float]:
    """The finite values of `column` in `rows`."""
    values = [row.get(column) for row in rows]
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def union_of(rows: list[dict[str, Any]], column: str) -> list[float] | None:
    """The list columns `column` of `rows` concatenated in round order; None when a round lacks it."""
    lists = [plain_value(row.get(column)) for row in rows]
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
    - the phases (`forward_ms_*`, `backward_ms_*`): samples the union, medians of the round medians;
    - peak memory, the matmul rate and the bandwidth: medians over the rounds; throughput,
      `tflops_per_s`, the floor and roofline columns from the combined median; `cell_wall_s` summed, `started_at` the first round's.
    """
    first, last = rows[0], rows[-1]
    out = {k: v for k, v in last.items() if k not in (ROW_TYPE, ROUND)}
    samples = union_of(rows, TIME_MS_SAMPLES) or []
    cpu = union_of(rows, CPU_TIME_MS_SAMPLES)
    out.update(measurement.Timing(samples, timer=str(last.get(TIMER) or "perf_counter_ns"), cpu_samples_ms=cpu).as_row())
    medians = numbers_of(rows, TIME_MS_MEDIAN)
    median = measurement.median_of(medians)
    out.update(
        {
            TIME_MS_MEDIAN: median,
            ROUND_MEDIANS_MS: medians,
            ROUND_DRIFT: max(medians) / min(medians) - 1 if medians and min(medians) > 0 else math.nan,
            ROUNDS: len(rows),
            STARTED_AT: first.get(STARTED_AT),
            CELL_WALL_S: sum(numbers_of(rows, CELL_WALL_S)),
            MESSAGE: next((str(r[MESSAGE]) for r in reversed(rows) if r.get(MESSAGE)), ""),
        }
    )
    for phase, (median_column, _, samples_column) in measurement.PHASE_COLUMNS.items():
        phase_samples = union_of(rows, samples_column)
        if phase_samples is not None:
            out.update(measurement.phase_columns({phase: phase_samples}))
            out[median_column] = measurement.median_of(numbers_of(rows, median_column))  # of the round medians, as the total
    shares = union_of(rows, CPU_SHARE_SAMPLES)
    if shares is not None:
        out.update({CPU_SHARE_SAMPLES: shares, CPU_SHARE: measurement.median_of(shares)})
    contended = [r for r in rows if r.get(CONTENDED)]
    out.update(
        {
            CONTENDED: bool(contended),
            CONTENTION: "; ".join(f"round {r.get(ROUND)}: {r.get(CONTENTION)}" for r in contended),
            CONTENTION_RETRIES_USED: int(sum(numbers_of(rows, CONTENTION_RETRIES_USED))),
        }
    )
    worst = max(rows, key=lambda r: numbers_of([r], OTHER_CPU_CORES) or [-1.0])
    for column in (OTHER_CPU_CORES, OTHER_BUSY_PROCESSES, LOAD_AVG_1M):
        if column in worst:
            out[column] = worst[column]
    for column in (GPU_OTHER_PROCESSES, GPU_OTHER_SM_UTIL_PCT):
        if numbers_of(rows, column):
            out[column] = max(numbers_of(rows, column))
    for column in (PEAK_MEM_MIB, ACTIVATION_MEM_MIB, PEAK_RESERVED_MIB, MATMUL_GFLOPS, MEMBW_GBYTES_PER_S):
        if numbers_of(rows, column):
            out[column] = measurement.median_of(numbers_of(rows, column))
    seconds = median / 1e3
    last_seconds = float(last.get(TIME_MS_MEDIAN) or math.nan) / 1e3
    if numbers_of([last], TOKENS_PER_S) and seconds > 0:
        out[TOKENS_PER_S] = float(last[TOKENS_PER_S]) * last_seconds / seconds
    if numbers_of([last], FLOPS) and seconds > 0:
        out[TFLOPS_PER_S] = float(last[FLOPS]) / seconds / 1e12
    out.update(floor_columns(out))
    out.update(roofline_columns(out))
    return out


def floor_columns(row: Mapping[str, Any]) -> dict[str, float]:
    """The compute-floor columns of a result row that has `matmul_gflops` (else {}), the one place
    they are defined:

    - `floor_s` = flops / (matmul_gflops * 1e9): seconds the cell's analytic FLOPs (forward, plus
      2x those with a backward, `workloads.step_flops`) would take at the measured matmul rate;
    - `floor_ratio` = (time_ms_median / 1e3) / floor_s: the median time per step over that floor
      (1 = the step runs at the matmul rate; a target "within 1.5x of the floor" is floor_ratio <= 1.5).

    NaN where an input is missing, not finite or not positive.
    """
    if MATMUL_GFLOPS not in row:
        return {}
    number = positive_number
    flops, gflops, median_ms = number(row, FLOPS), number(row, MATMUL_GFLOPS), number(row, TIME_MS_MEDIAN)
    floor_s = flops / (gflops * 1e9)
    return {FLOOR_S: floor_s, FLOOR_RATIO: median_ms / 1e3 / floor_s}


def positive_number(row: Mapping[str, Any], key: str) -> float:
    """`row[key]` as a float when it is finite and positive, else NaN."""
    value = row.get(key)
    try:
        value = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) and value > 0 else math.nan


def roofline_point(flops: float, bytes_moved: float, seconds: float, gflops_roof: float, gbytes_roof: float) -> dict[str, Any]:
    """Where a call of `flops` FLOPs moving `bytes_moved` bytes in `seconds` sits under the two roofs
    (GFLOP/s, GB/s), the roofline model (Williams et al. 2009): `intensity` = flops / bytes (FLOP
    per byte), `gbytes_per_s` = bytes / s / 1e9, `compute_fraction` = achieved FLOP/s over the
    compute roof, `memory_fraction` = achieved bytes/s over the memory roof, `bound` "memory" when
    intensity x bandwidth is below the compute roof (left of the ridge point), else "compute",
    and `roof_fraction` = achieved FLOP/s over min(compute roof, intensity x bandwidth), the
    fraction of the roof that bounds it. NaN (bound None) where an input is missing."""
    intensity = flops / bytes_moved
    achieved_gflops = flops / seconds / 1e9
    attainable = min(gflops_roof, intensity * gbytes_roof) if not math.isnan(gflops_roof + gbytes_roof) else math.nan
    bound = None if math.isnan(attainable) else ("memory" if intensity * gbytes_roof < gflops_roof else "compute")
    return {
        INTENSITY: intensity,
        GBYTES_PER_S: bytes_moved / seconds / 1e9,
        COMPUTE_FRACTION: achieved_gflops / gflops_roof,
        MEMORY_FRACTION: bytes_moved / seconds / 1e9 / gbytes_roof,
        BOUND: bound,
        ROOF_FRACTION: achieved_gflops / attainable,
    }


def roofline_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    """The roofline columns of a result row that has `bytes` (else {}), the one place they are
    derived: `intensity` and `gbytes_per_s` from the analytic bytes and the median time, and where
    the row has the measured roofs (`matmul_gflops`, `membw_gbytes_per_s`) `compute_fraction`,
    `memory_fraction`, `bound` and `roof_fraction` (`roofline_point`; NaN without them)."""
    if not math.isfinite(positive_number(row, BYTES)):
        return {}
    seconds = positive_number(row, TIME_MS_MEDIAN) / 1e3
    point = roofline_point(
        positive_number(row, FLOPS),
        positive_number(row, BYTES),
        seconds,
        positive_number(row, MATMUL_GFLOPS),
        positive_number(row, MEMBW_GBYTES_PER_S),
    )
    return point
