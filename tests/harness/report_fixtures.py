"""Small synthetic benchmark runs for the report tests, stored the way `python -m harness run` stores them.

Each builder writes one finished run folder under a results root with `harness.results.RunStore`:
run.json first (suite, suite text, command, planned cells, environment), then one row per cell
(`store.append`, the journal `cells/*.json`), then `store.fold()` into results.parquet and the
`finished_at` update. The configuration columns and cell keys come from `BenchmarkCell`, as in a
real sweep; every metric comes from the formulas below, which are what the tests check the report
against (nothing here is copied from a measured run).

seq_length (one attention layer, forward + backward, a constant TOKENS = 32,768 tokens per step,
so batch = TOKENS / L, L = 1K..32K; variants full, sdpa and lsh with 1, 2, 4, 8 hash rounds):

- time per step (ms) = batch * per-sequence time: full FULL_MS * L^2, sdpa SDPA_MS * L^2,
  lsh LSH_MS * n_hashes * L; so at constant tokens full/sdpa grow as L^1 per step, lsh is flat;
- peak memory (MiB) = BASE_MIB + batch * per-sequence memory: full FULL_MIB * L^2 (the score
  matrix), sdpa SDPA_MIB * L, lsh LSH_MIB * n_hashes * L;
- a cell whose peak memory would exceed DEVICE_MEMORY_MIB is an `oom` row (only full at 32K);
- timing samples: SEQ_REPEATS values median * (1 + IQR_FRACTION * u), u evenly spaced on [-1, 1],
  so the median is the formula's time, the IQR is IQR_FRACTION * median, min/max median * (1 -/+ IQR_FRACTION);
- tokens_per_s = batch * L / (time / 1000); flops: the analytic count in `seq_flops`;
- with `matmul_rate=True` (a suite with `measure.matmul_rate`): `matmul_gflops` evenly spaced from
  MATMUL_GFLOPS[0] to MATMUL_GFLOPS[1] over the cells in order, `matmul_n` MATMUL_N, and the floor
  columns derived as the runner derives them (`harness.cells.benchmark.floor_columns`).

layers_memory (a whole Reformer LM, training step, L = 16,384, batch 1, lsh with 2 hash rounds;
n_layers 1, 2, 4, 6, 8, 12 with standard and reversible residuals):

- peak memory (MiB) = STANDARD_BASE_MIB + STANDARD_MIB_PER_LAYER * n_layers (standard) or
  REVERSIBLE_BASE_MIB + REVERSIBLE_MIB_PER_LAYER * n_layers (reversible: about flat);
- time per step (ms) = LAYERS_BASE_MS + (STANDARD_MS_PER_LAYER or REVERSIBLE_MS_PER_LAYER) * n_layers;
- LAYERS_REPEATS timing samples around the median as above.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from harness.cells import model_fields
from harness.cells.benchmark import BenchmarkCell, floor_columns
from harness.store.writer import RunStore

# --------------------------------------------------------------------------- environment (run.json)

DEVICE_NAME = "NVIDIA H100 80GB HBM3"
GPU_DRIVER = "580.159.04"
TORCH_VERSION = "2.11.0+cu130"
CODE_VERSION = "nocommit+dirty.173260f8"
THREADS = 16
DEVICE_MEMORY_MIB = 81559.0  # what an 80 GB H100 offers torch
NVML = {
    "sm_clock_mhz": 1980,
    "sm_clock_max_mhz": 1980,
    "mem_clock_mhz": 2619,
    "temperature_c": 40,
    "power_w": 120.0,
    "power_limit_w": 700.0,
    "throttle_reasons": 0,
}

SEQ_SUITE = "seq_length"
SEQ_RUN_ID = "20260301T120000Z-nvidia-h100-80gb-hbm3"
SEQ_COMMAND = "python -m harness run suites/seq_length.yaml --out /tmp/r"
LAYERS_SUITE = "layers_memory"
LAYERS_RUN_ID = "20260301T121000Z-nvidia-h100-80gb-hbm3"
LAYERS_COMMAND = "python -m harness run suites/layers_memory.yaml --out /tmp/r"

# --------------------------------------------------------------------------- seq_length formulas

TOKENS = 32768
SEQ_LENS = (1024, 2048, 4096, 8192, 16384, 32768)
SEQ_MODEL = {"d_model": 256, "n_heads": 4, "causal": False}
BUCKET_SIZE = 64
# series label -> (variant, variant params), in suite order
SEQ_VARIANTS: dict[str, tuple[str, dict[str, int]]] = {
    "full": ("full", {}),
    "sdpa": ("sdpa", {}),
    **{f"lsh n_hashes={n}": ("lsh", {"bucket_size": BUCKET_SIZE, "n_hashes": n}) for n in (1, 2, 4, 8)},
}
FULL_MS = 2e-7  # ms per (query, key) pair of one sequence
SDPA_MS = 1.5e-7
LSH_MS = 1.5e-4  # ms per token and hash round
BASE_MIB = 256.0
FULL_MIB = 3 / 32768  # MiB per (query, key) pair: 3 MiB per unit of L at 32,768 tokens per step
SDPA_MIB = 1 / 128  # MiB per token
LSH_MIB = 1 / 64  # MiB per token and hash round
SEQ_REPEATS = 11
IQR_FRACTION = 0.02
MATMUL_GFLOPS = (380_000.0, 420_000.0)
MATMUL_N = 8192
SEQ_MEASURE = {"warmup": 2, "min_repeats": 10, "min_time_s": 1.0, "max_time_s": 60, "flush_l2": True, "timeout_s": 600}

# --------------------------------------------------------------------------- layers_memory formulas

LAYERS_SEQ_LEN = 16384
N_LAYERS = (1, 2, 4, 6, 8, 12)
RESIDUALS = ("standard", "reversible")
LAYERS_MODEL = {"d_model": 256, "n_heads": 4, "d_ff": 1024, "vocab_size": 256, "causal": True, "ffn_chunks": 1}
LAYERS_VARIANT = ("lsh", {"bucket_size": BUCKET_SIZE, "n_hashes": 2})
STANDARD_BASE_MIB = 128.0
STANDARD_MIB_PER_LAYER = 576.0  # every layer's activations are kept for backward
REVERSIBLE_BASE_MIB = 700.0
REVERSIBLE_MIB_PER_LAYER = 0.25  # activations recomputed in backward: about flat
LAYERS_BASE_MS = 1.5
STANDARD_MS_PER_LAYER = 6.5
REVERSIBLE_MS_PER_LAYER = 8.5  # the recomputation costs time
LAYERS_REPEATS = 3
LAYERS_MEASURE = {"warmup": 1, "min_repeats": 3, "min_time_s": 0.0, "max_time_s": 60, "timeout_s": 600, "skip_after_oom": False}


def seq_batch(seq_len: int) -> int:
    """Sequences per step at the constant TOKENS per step."""
    return TOKENS // seq_len


def seq_time_ms(series: str, seq_len: int) -> float:
    """Median time per step (ms) of a seq_length cell (SEQ_VARIANTS label `series`)."""
    variant, params = SEQ_VARIANTS[series]
    per_sequence = {
        "full": FULL_MS * seq_len**2,
        "sdpa": SDPA_MS * seq_len**2,
        "lsh": LSH_MS * params.get("n_hashes", 0) * seq_len,
    }[variant]
    return seq_batch(seq_len) * per_sequence


def seq_peak_mib(series: str, seq_len: int) -> float:
    """Peak memory (MiB) of a seq_length cell (also where it exceeds the device: an OOM)."""
    variant, params = SEQ_VARIANTS[series]
    per_sequence = {
        "full": FULL_MIB * seq_len**2,
        "sdpa": SDPA_MIB * seq_len,
        "lsh": LSH_MIB * params.get("n_hashes", 0) * seq_len,
    }[variant]
    return BASE_MIB + seq_batch(seq_len) * per_sequence


def seq_oom(series: str, seq_len: int) -> bool:
    """Whether the cell runs out of device memory."""
    return seq_peak_mib(series, seq_len) > DEVICE_MEMORY_MIB


def seq_flops(series: str, seq_len: int) -> int:
    """Analytic FLOPs of a forward + backward step (backward = 2x forward): projections 8 b L d^2 and
    scores + weighted sum 4 b L span d, span = L (full, sdpa) or 2 * bucket_size * n_hashes (lsh)."""
    variant, params = SEQ_VARIANTS[series]
    b, d = seq_batch(seq_len), SEQ_MODEL["d_model"]
    span = seq_len if variant != "lsh" else min(seq_len, 2 * params["bucket_size"]) * params["n_hashes"]
    return 3 * (8 * b * seq_len * d * d + 4 * b * seq_len * span * d)


def layers_time_ms(residual: str, n_layers: int) -> float:
    """Median time per training step (ms) of a layers_memory cell."""
    per_layer = STANDARD_MS_PER_LAYER if residual == "standard" else REVERSIBLE_MS_PER_LAYER
    return LAYERS_BASE_MS + per_layer * n_layers


def layers_peak_mib(residual: str, n_layers: int) -> float:
    """Peak training memory (MiB) of a layers_memory cell."""
    if residual == "standard":
        return STANDARD_BASE_MIB + STANDARD_MIB_PER_LAYER * n_layers
    return REVERSIBLE_BASE_MIB + REVERSIBLE_MIB_PER_LAYER * n_layers


def layers_breakdown_mib(residual: str, n_layers: int) -> dict[str, float]:
    """The memory breakdown of a layers_memory cell (MiB): float32 parameters, as many gradients,
    AdamW's two moments, and the step's peak above them (the cell's peak memory)."""
    d, d_ff, vocab = LAYERS_MODEL["d_model"], LAYERS_MODEL["d_ff"], LAYERS_MODEL["vocab_size"]
    params = (n_layers * (4 * d * d + 2 * d * d_ff) + 2 * vocab * d) * 4 / 2**20
    peak = layers_peak_mib(residual, n_layers)
    return {"param_mem_mib": params, "grad_mem_mib": params, "optim_mem_mib": 2 * params, "activation_mem_mib": peak}


def time_samples(median_ms: float, repeats: int) -> list[float]:
    """`repeats` samples evenly spread around `median_ms`: median `median_ms`, IQR IQR_FRACTION * median."""
    u = [(2 * i - (repeats - 1)) / (repeats - 1) for i in range(repeats)]  # symmetric on [-1, 1]
    return [median_ms * (1 + IQR_FRACTION * v) for v in u]


# --------------------------------------------------------------------------- rows and runs


def _environment(started_at: str, argv: list[str]) -> dict[str, Any]:
    """run.json's environment block, as `harness.environment.capture_environment` writes it."""
    return {
        "started_at_utc": started_at,
        "git_sha": None,
        "git_dirty": True,
        "code_version": CODE_VERSION,
        "python": "3.12.3",
        "torch": TORCH_VERSION,
        "torch_cuda": "13.0",
        "cudnn": 91900,
        "device": "cuda",
        "device_name": DEVICE_NAME,
        "gpu_driver": GPU_DRIVER,
        "nvml": dict(NVML),
        "cpu_model": "Intel(R) Xeon(R) Processor",
        "cpu_cores_physical": 16,
        "cpu_cores_logical": 16,
        "ram_total_gib": 125.87,
        "torch_threads": THREADS,
        "variant_backends": {"lsh_cpu_kernel": "not loaded (CUDA run)"},
        "command": argv,
        "hostname": "synthetic",
        "platform": "Linux-6.18-x86_64-with-glibc2.39",
    }


def _cell(
    suite: str,
    workload: str,
    mode: str,
    seq_len: int,
    batch: int,
    tokens: int | None,
    model: dict,
    variant: str,
    params: dict,
    label: str,
    measure: dict,
) -> BenchmarkCell:
    """The cell a suite of these settings expands into (model defaults filled in, as the loader does)."""
    defaults = {name: default for name, (_, default) in model_fields().items()}
    return BenchmarkCell(
        suite=suite,
        workload=workload,
        mode=mode,
        device="cuda",
        dtype="float32",
        seq_len=seq_len,
        batch=batch,
        tokens_per_batch=tokens,
        model=json.loads(json.dumps(defaults | model)),
        variant=variant,
        variant_params=dict(params),
        label=label,
        measure=dict(measure),
    )


def _measured(median_ms: float, repeats: int, peak_mib: float, tokens: int, flops: int, n_params: int) -> dict[str, Any]:
    """The metric columns of a finished cell (`measure_cell`'s ok row) from its formula values."""
    samples = time_samples(median_ms, repeats)
    seconds = median_ms / 1000
    return {
        "time_ms_median": median_ms,
        "time_ms_iqr": IQR_FRACTION * median_ms,
        "time_ms_min": min(samples),
        "time_ms_max": max(samples),
        "time_ms_mean": float(np.mean(samples)),
        "time_ms_samples": samples,
        "n_repeats": repeats,
        "time_noisy": IQR_FRACTION > 0.10,
        "timer": "cuda_event",
        "peak_mem_mib": peak_mib,
        "peak_reserved_mib": 2.0 * math.ceil(peak_mib / 2.0) + 256.0,
        "mem_method": "cuda_max_memory_allocated",
        "status": "ok",
        "message": "",
        "flops": flops,
        "tokens_per_s": tokens / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "n_params": n_params,
        **{f"nvml_after_{k}": v for k, v in NVML.items()},
    }


def _store_run(
    root: Path, suite: str, run_id: str, suite_text: str, description: str, command: str, cells: list[tuple[BenchmarkCell, dict]]
) -> Path:
    """Write a finished run as `harness run` does: run.json, rows one by one, fold, finished_at."""
    store = RunStore(root, suite, run_id)
    started = f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}T{run_id[9:11]}:{run_id[11:13]}:{run_id[13:15]}+00:00"
    keys = [cell.key(CODE_VERSION) for cell, _ in cells]
    argv = command.split()[3:]  # "python -m harness run ..." -> sys.argv[1:]
    store.write_run_info(
        {
            "suite": suite,
            "suite_path": f"suites/{suite}.yaml",
            "suite_text": suite_text,
            "kind": "benchmark",
            "description": description,
            "code_version": CODE_VERSION,
            "n_cells": len(cells),
            "cell_keys": keys,
            "cell_labels": {k: " ".join(cell.describe().split()) for k, (cell, _) in zip(keys, cells)},
            "executor": "local",
            "command": command,
            "started_at": started,
            "environment": _environment(started, ["/work/main/harness/__main__.py", *argv]),
        }
    )
    minute, second = int(run_id[11:13]), int(run_id[13:15])
    for i, ((cell, metrics), key) in enumerate(zip(cells, keys)):
        total = second + 3 * i
        stamp = f"{started[:14]}{minute + total // 60:02d}:{total % 60:02d}+00:00"
        store.append(
            {
                **cell.to_row(),
                "run_id": run_id,
                "suite": suite,
                "cell_key": key,
                "code_version": CODE_VERSION,
                "started_at": stamp,
                "cell_wall_s": 2.5,
                "threads": THREADS,
                "device_name": DEVICE_NAME,
                **{f"nvml_before_{k}": v for k, v in NVML.items()},
                **metrics,
            }
        )
    store.fold()
    store.update_run_info(finished_at=f"{started[:14]}{minute + 5:02d}:00+00:00", wall_s=300.0)
    return store.path


SEQ_SUITE_TEXT = f"""name: {SEQ_SUITE}
description: Synthetic seq_length run (tests/harness/report_fixtures.py).
device: cuda
dtype: float32
mode: forward_backward
workload: attention
model: {{d_model: 256, n_heads: 4, causal: false}}
sweep:
  seq_len: [{", ".join(map(str, SEQ_LENS))}]
  tokens_per_batch: [{TOKENS}]
variants:
  - {{name: full}}
  - {{name: sdpa}}
  - {{name: lsh, n_hashes: [1, 2, 4, 8], bucket_size: {BUCKET_SIZE}}}
measure: {{warmup: 2, min_repeats: 10, min_time_s: 1.0, max_time_s: 60, flush_l2: true, timeout_s: 600}}
"""

LAYERS_SUITE_TEXT = f"""name: {LAYERS_SUITE}
description: Synthetic layers_memory run (tests/harness/report_fixtures.py).
device: cuda
dtype: float32
mode: train_step
workload: model
model: {{d_model: 256, n_heads: 4, d_ff: 1024, vocab_size: 256, causal: true, ffn_chunks: 1}}
sweep:
  seq_len: [{LAYERS_SEQ_LEN}]
  batch: [1]
  n_layers: [{", ".join(map(str, N_LAYERS))}]
  residual: [standard, reversible]
variants:
  - {{name: lsh, n_hashes: 2, bucket_size: {BUCKET_SIZE}}}
measure: {{warmup: 1, min_repeats: 3, min_time_s: 0.0, max_time_s: 60, timeout_s: 600, skip_after_oom: false}}
"""


def seq_length_run(root: str | Path, run_id: str = SEQ_RUN_ID, matmul_rate: bool = False) -> Path:
    """A finished seq_length run under `root` (root/seq_length/run_id); returns its folder."""
    cells = []
    for label, (variant, params) in SEQ_VARIANTS.items():
        for seq_len in SEQ_LENS:
            cells.append(
                (
                    _cell(
                        SEQ_SUITE,
                        "attention",
                        "forward_backward",
                        seq_len,
                        seq_batch(seq_len),
                        TOKENS,
                        SEQ_MODEL,
                        variant,
                        params,
                        label,
                        SEQ_MEASURE,
                    ),
                    label,
                )
            )
    rates = np.linspace(*MATMUL_GFLOPS, len(cells))
    rows = []
    for i, (cell, label) in enumerate(cells):
        if seq_oom(label, cell.seq_len):
            need_gib = (seq_peak_mib(label, cell.seq_len) - BASE_MIB) / 1024
            metrics: dict[str, Any] = {
                "status": "oom",
                "message": f"OutOfMemoryError: CUDA out of memory. Tried to allocate {need_gib:.2f} GiB. "
                f"GPU 0 has a total capacity of {DEVICE_MEMORY_MIB / 1024:.2f} GiB.",
            }
        else:
            metrics = _measured(
                seq_time_ms(label, cell.seq_len),
                SEQ_REPEATS,
                seq_peak_mib(label, cell.seq_len),
                TOKENS,
                seq_flops(label, cell.seq_len),
                4 * SEQ_MODEL["d_model"] ** 2,
            )
            if matmul_rate:
                metrics.update(matmul_gflops=float(rates[i]), matmul_n=MATMUL_N)
                metrics.update(floor_columns(metrics))
        rows.append((cell, metrics))
    description = (
        "Synthetic seq_length run: one attention layer at 32,768 tokens per step; full attention "
        "quadratic per sequence, LSH linear; full attention runs out of memory at 32K.\n"
    )
    return _store_run(Path(root), SEQ_SUITE, run_id, SEQ_SUITE_TEXT, description, SEQ_COMMAND, rows)


def layers_memory_run(root: str | Path, run_id: str = LAYERS_RUN_ID) -> Path:
    """A finished layers_memory run under `root` (root/layers_memory/run_id); returns its folder."""
    variant, params = LAYERS_VARIANT
    d, d_ff, vocab = LAYERS_MODEL["d_model"], LAYERS_MODEL["d_ff"], LAYERS_MODEL["vocab_size"]
    rows = []
    for n_layers in N_LAYERS:
        for residual in RESIDUALS:
            model = LAYERS_MODEL | {"n_layers": n_layers, "residual": residual}
            cell = _cell(LAYERS_SUITE, "model", "train_step", LAYERS_SEQ_LEN, 1, None, model, variant, params, variant, LAYERS_MEASURE)
            span = 2 * params["bucket_size"] * params["n_hashes"]
            block = 8 * LAYERS_SEQ_LEN * d * d + 4 * LAYERS_SEQ_LEN * span * d + 4 * LAYERS_SEQ_LEN * d * d_ff
            flops = 3 * (n_layers * block + 2 * LAYERS_SEQ_LEN * d * vocab)
            metrics = _measured(
                layers_time_ms(residual, n_layers),
                LAYERS_REPEATS,
                layers_peak_mib(residual, n_layers),
                LAYERS_SEQ_LEN,
                flops,
                n_layers * (4 * d * d + 2 * d * d_ff) + 2 * vocab * d,
            )
            metrics.update(layers_breakdown_mib(residual, n_layers))
            rows.append((cell, metrics))
    description = (
        "Synthetic layers_memory run: peak training memory of a Reformer LM against its depth, standard against reversible residuals.\n"
    )
    return _store_run(Path(root), LAYERS_SUITE, run_id, LAYERS_SUITE_TEXT, description, LAYERS_COMMAND, rows)
