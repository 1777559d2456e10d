"""harness.measurement.gpu_timers: the kernel-time arithmetic on hand-made profiler events, the
refusal of the CUDA-only timers on CPU, and (on a GPU only) `kernels` and `graphs` against CUDA
events on a known kernel."""

from __future__ import annotations

import pytest
import torch

from harness.measurement import PhasedStep, TimingSettings, time_callable, time_step
from harness.measurement.gpu_timers import RANGE_PREFIX, DeviceInterval, busy_ms, kernel_phase_times

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MS = 1_000_000  # ns


def test_busy_time_is_the_union_of_intervals() -> None:
    assert busy_ms([]) == 0.0
    assert busy_ms([(0, 2 * MS), (5 * MS, 6 * MS)]) == 3.0  # serial kernels: their sum
    assert busy_ms([(0, 4 * MS), (1 * MS, 2 * MS), (3 * MS, 6 * MS)]) == 6.0  # overlapping ones count once


def test_kernels_are_assigned_to_the_phase_whose_host_range_they_start_in() -> None:
    events = [
        DeviceInterval(f"{RANGE_PREFIX}0.forward", False, 0, 10 * MS),
        DeviceInterval(f"{RANGE_PREFIX}0.backward", False, 10 * MS, 30 * MS),
        DeviceInterval(f"{RANGE_PREFIX}1.forward", False, 30 * MS, 40 * MS),
        DeviceInterval(f"{RANGE_PREFIX}1.backward", False, 40 * MS, 60 * MS),
        DeviceInterval("gemm", True, 1 * MS, 3 * MS),  # repeat 0 forward: 2 + 1 ms, a launch gap between
        DeviceInterval("softmax", True, 5 * MS, 6 * MS),
        DeviceInterval("gemm_bwd", True, 12 * MS, 20 * MS),  # repeat 0 backward: 8 ms
        DeviceInterval(f"{RANGE_PREFIX}0.backward", True, 11 * MS, 29 * MS),  # the range's device copy: not a kernel
        DeviceInterval("gemm", True, 31 * MS, 33 * MS),  # repeat 1 forward: 2 ms
        DeviceInterval("host_op", False, 41 * MS, 59 * MS),  # host work: not device time
    ]
    times = kernel_phase_times(events, 2, ("forward", "backward"))
    assert times == {"forward": [3.0, 2.0], "backward": [8.0, 0.0]}


def test_kernels_and_graphs_are_refused_on_cpu() -> None:
    settings = TimingSettings(warmup=0, min_repeats=1, min_time_s=0.0)
    for timer in ("kernels", "graphs"):
        with pytest.raises(ValueError, match=f"measure.timer '{timer}' needs a CUDA device"):
            time_step(lambda: None, "cpu", settings, timer)
    with pytest.raises(ValueError, match="unknown timer"):
        time_step(lambda: None, "cpu", settings, "wall")
    assert time_step(lambda: None, "cpu", settings, "events").timer == "perf_counter_ns"


def _matmuls(n: int = 2048, count: int = 8):
    a = torch.randn(n, n, device="cuda")

    def forward():
        out = a
        for _ in range(count):
            out = out @ a
        return out

    return forward


@needs_cuda
def test_kernel_time_agrees_with_events_on_back_to_back_matmuls() -> None:
    """Eight 2048^3 matmuls launched back to back leave the GPU no gaps: kernel time and event
    time must agree within 10%, and kernel time can only be the smaller."""
    forward = _matmuls()
    step = PhasedStep(forward, lambda out: out @ out)
    settings = TimingSettings(warmup=2, min_repeats=10, min_time_s=0.0)
    events = time_callable(step, "cuda", settings)
    kernels = time_step(step, torch.device("cuda"), settings, "kernels")
    assert kernels.timer == "cuda_kernels" and kernels.n_repeats == 10
    assert kernels.median_ms == pytest.approx(events.median_ms, rel=0.10) and kernels.median_ms <= events.median_ms * 1.02
    for phase in ("forward", "backward"):
        assert kernels.phase_samples_ms[phase] and min(kernels.phase_samples_ms[phase]) > 0


@needs_cuda
def test_kernel_time_leaves_host_gaps_out() -> None:
    """A repeat that sleeps on the host between two kernels: events count the sleep, kernels do not."""
    import time

    a = torch.randn(1024, 1024, device="cuda")

    def gappy():
        out = a @ a
        time.sleep(0.005)
        return out @ a

    settings = TimingSettings(warmup=1, min_repeats=5, min_time_s=0.0)
    events = time_callable(gappy, "cuda", settings)
    kernels = time_step(gappy, torch.device("cuda"), settings, "kernels")
    assert events.median_ms > 4.5 and kernels.median_ms < events.median_ms - 4.0


@needs_cuda
def test_graph_replays_time_a_forward_backward_step() -> None:
    from harness.workloads import build_workload
    from tests.harness.measurement.workload_cells import tiny_cell

    cell = tiny_cell("full", seq_len=256, d_model=64, device="cuda")
    workload = build_workload(cell, torch.device("cuda"))
    settings = TimingSettings(warmup=2, min_repeats=10, min_time_s=0.0)
    events = time_callable(workload.step, "cuda", settings)
    graphs = time_step(workload.step, torch.device("cuda"), settings, "graphs")
    assert graphs.timer == "cuda_graph" and set(graphs.phase_samples_ms) == {"forward", "backward"}
    assert 0 < graphs.median_ms <= events.median_ms * 1.1  # no launch overhead: never much slower
