"""The environment a run was measured in, as the report's "Environment" table shows it."""

from __future__ import annotations

import json
import re
from typing import Any

import pandas as pd

from harness.analysis.tables import is_contended
from harness.store.schema import (
    CODE_VERSION,
    CONTENDED,
    CPU_SHARE,
    DETERMINISTIC_ALGORITHMS,
    DEVICE,
    DEVICE_NAME,
    FLOAT32_MATMUL_PRECISION,
    GPU_OTHER_PROCESSES,
    LOAD_AVG_1M,
    OPTIONAL_PACKAGES,
    OTHER_CPU_CORES,
    STARTED_AT,
    TF32_CUDA_MATMUL,
    TF32_CUDNN,
    split,
)

# An absolute path inside a recorded description (e.g. the CPU kernel's cache file under the home
# folder of whoever ran it): the report shows its last part, so it names no machine or user.
ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:[^\s()/]+/)+([^\s()/]+)")


def without_machine_paths(text: Any) -> Any:
    """`text` with each absolute path replaced by its file name ("(/root/.cache/x/k.so)" -> "(k.so)");
    anything that is not a string is returned as it is."""
    return ABSOLUTE_PATH.sub(r"\1", text) if isinstance(text, str) else text


def machine_load_text(rows: pd.DataFrame) -> str:
    """One line on the machine's load during the run, from the cells' contention columns: CPU share
    (median and range), other processes' cores, load average, GPU processes, contended cells."""
    parts = []

    def numbers(column: str) -> pd.Series:
        return pd.to_numeric(rows[column], errors="coerce").dropna() if column in rows else pd.Series(dtype=float)

    share, other, load, gpu = numbers(CPU_SHARE), numbers(OTHER_CPU_CORES), numbers(LOAD_AVG_1M), numbers(GPU_OTHER_PROCESSES)
    if len(share):
        parts.append(f"CPU share median {share.median():.2f} ({share.min():.2f}-{share.max():.2f})")
    if len(other):
        parts.append(f"other processes' CPU {other.median():.2f} cores median (max {other.max():.2f})")
    if len(load):
        parts.append(f"load average {load.min():.1f}-{load.max():.1f}")
    if len(gpu):
        parts.append(f"other GPU processes up to {int(gpu.max())}")
    if CONTENDED in rows:
        parts.append(f"{int(is_contended(rows).sum())} of {int(rows[CONTENDED].notna().sum())} cells contended")
    return "; ".join(parts) or "not recorded"


def numerics_items(env: dict, rows: pd.DataFrame) -> list[tuple[str, Any]]:
    """Environment-table lines of the settings that change numbers (harness.environment): float32
    matmul precision (the cells' own when they recorded it), TF32, determinism, optional package
    versions (those the cells imported, and those installed), CPU governor / boost, GPU clock lock."""
    numerics = env.get("numerics") or {}

    def used(column: str, fallback: Any) -> Any:
        values = sorted({str(v) for v in rows[column].dropna()}) if column in rows else []
        return ", ".join(values) if values else fallback

    imported: dict[str, str] = {}
    recorded = OPTIONAL_PACKAGES in rows and rows[OPTIONAL_PACKAGES].notna().any()
    for text in rows[OPTIONAL_PACKAGES].dropna().unique() if recorded else []:
        try:
            imported.update(json.loads(str(text)))
        except (ValueError, TypeError, AttributeError):
            continue
    installed = env.get(OPTIONAL_PACKAGES) or {}
    frequency = env.get("cpu_frequency") or {}
    clocks = env.get("gpu_clocks") or {}
    if not numerics and not installed and not frequency and not clocks and FLOAT32_MATMUL_PRECISION not in rows:
        return []  # a run from before these were recorded
    return [
        ("float32 matmul precision", used(FLOAT32_MATMUL_PRECISION, numerics.get(FLOAT32_MATMUL_PRECISION))),
        (
            "TF32 (CUDA matmul / cuDNN)",
            f"{used(TF32_CUDA_MATMUL, numerics.get(TF32_CUDA_MATMUL))} / {used(TF32_CUDNN, numerics.get(TF32_CUDNN))}",
        ),
        ("deterministic algorithms", used(DETERMINISTIC_ALGORITHMS, numerics.get(DETERMINISTIC_ALGORITHMS))),
        (
            "optional packages imported by the cells",
            ", ".join(f"{k} {v}" for k, v in sorted(imported.items())) or "none" if recorded else None,
        ),
        ("optional packages installed", ", ".join(f"{k} {v}" for k, v in sorted(installed.items())) or "none" if env else None),
        ("CPU governor / boost", f"{frequency.get('governor', 'unknown')} / {frequency.get('boost', 'unknown')}" if frequency else None),
        ("GPU clocks locked (NVML)", clocks.get("clocks_locked") if clocks else None),
    ]


def environment_table(info: dict, rows: pd.DataFrame) -> pd.DataFrame:
    """The "Environment" table of a run: device, versions, threads, backends, CPU, RAM, code version,
    GPU clocks, the settings that change numbers, the machine's load, start and finish."""
    env = info.get("environment") or {}
    cores = f"{env.get('cpu_cores_physical', '?')} physical / {env.get('cpu_cores_logical', '?')} logical"
    nvml = env.get("nvml") or {}
    versions = sorted(rows[CODE_VERSION].dropna().astype(str).unique()) if CODE_VERSION in rows else []
    items = [
        (DEVICE, env.get(DEVICE_NAME) or env.get(DEVICE)),
        ("GPU driver", env.get("gpu_driver")),
        ("torch", env.get("torch")),
        ("CUDA (torch build)", env.get("torch_cuda")),
        ("cuDNN", env.get("cudnn")),
        ("threads (torch)", env.get("torch_threads")),
        *((f"backend: {name}", without_machine_paths(value)) for name, value in (env.get("variant_backends") or {}).items()),
        ("CPU", f"{env.get('cpu_model', '?')} ({cores})"),
        ("CPU vector extensions", env.get("cpu_simd")),
        ("RAM (GiB)", env.get("ram_total_gib")),
        ("Python", env.get("python")),
        ("platform", env.get("platform")),
        ("git SHA", env.get("git_sha") or "none (not a git commit)"),
        ("git dirty", env.get("git_dirty")),
        (CODE_VERSION, info.get(CODE_VERSION) or env.get(CODE_VERSION)),
        ("code_version of the rows", ", ".join(versions)),
        ("GPU clocks at start (NVML)", ", ".join(f"{k}={v}" for k, v in nvml.items())),
        *numerics_items(env, rows),
        ("machine load during the run", machine_load_text(split(rows).cells)),
        ("started", info.get(STARTED_AT) or env.get("started_at_utc")),
        (
            "finished",
            info.get("finished_at") or ("interrupted " + str(info["interrupted_at"]) if info.get("interrupted_at") else "not recorded"),
        ),
    ]
    frame = pd.DataFrame([(k, "-" if v is None or v == "" else str(v)) for k, v in items], columns=["", "value"])
    return frame.set_index("")
