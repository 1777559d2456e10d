"""`harness profile SUITE --filter ...`: where a cell's time goes, op by op (torch.profiler).

Runs in this process (no isolation: this is a diagnostic, not a measurement): builds each
selected cell's workload exactly as the runner does, warms it up, profiles `steps` calls and
prints torch.profiler's table sorted by self time. Variants can mark their stages with
`torch.profiler.record_function("name/stage")` (lsh does: lsh/hash, lsh/sort, lsh/attend,
lsh/attend_backward); those rows give each stage's total.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from harness.cells.benchmark import BenchmarkCell
from harness.workloads import build_workload


def profile_cell(cell: BenchmarkCell, device: torch.device, steps: int = 1, warmup: int = 2, top: int = 25) -> str:
    """torch.profiler table of `steps` calls of the cell's step (after `warmup` calls), top rows by self time.

    Times in the table are per profiled region, summed over the `steps` calls.
    """
    workload = build_workload(cell, device)
    for _ in range(warmup):
        workload.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            workload.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    header = f"{cell.label} seq_len={cell.seq_len} batch={cell.batch} {cell.mode} {cell.dtype} on {device} ({steps} step(s))"
    stages = [e for e in prof.key_averages() if "/" in e.key and not e.key.startswith("aten::")]
    lines = [header, prof.key_averages().table(sort_by=sort_by, row_limit=top)]
    if stages and device.type == "cuda":
        # On CUDA the CPU time of a scope is mostly kernel launches: its share is the device time of the
        # kernels the profiler attributes to it (the scope's GPU-side annotation).
        lines.append("stages (record_function scopes; CPU wall time incl. children, ms; device time, ms):")
        lines += [f"  {e.key:<28} {e.cpu_time_total / 1e3:10.1f} {_device_ms(e):10.1f}" for e in sorted(stages, key=lambda e: e.key)]
    elif stages:
        lines.append("stages (record_function scopes, CPU wall time incl. children, ms):")
        lines += [f"  {e.key:<28} {e.cpu_time_total / 1e3:10.1f}" for e in sorted(stages, key=lambda e: e.key)]
    return "\n".join(lines)


def _device_ms(event) -> float:
    """Device (CUDA) time of a profiler row in ms (`device_time_total`, `cuda_time_total` in older torch)."""
    return getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0)) / 1e3
