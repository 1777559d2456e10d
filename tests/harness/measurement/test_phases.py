"""Forward and backward timed apart (`PhasedStep` in `time_callable`): the phases of a repeat add up
to its total exactly, and on a sleep-free workload each phase reads what the same call timed on its
own reads (interleaved, medians within noise)."""

from __future__ import annotations

import pytest
import torch

from harness.measurement import PhasedStep, Timing, TimingSettings, phase_columns, time_callable
from harness.workloads import build_workload
from tests.harness.measurement.workload_cells import tiny_cell

CPU = torch.device("cpu")


def spin(n: int, size: int = 96) -> float:
    """`n` float64 matmuls of [size, size] (no sleeps: the CPU is busy the whole time)."""
    a = torch.full((size, size), 1.0 / size, dtype=torch.float64)
    for _ in range(n):
        a = a @ a
    return float(a[0, 0])


def test_phases_add_up_to_the_total_of_each_repeat() -> None:
    step = PhasedStep(lambda: spin(3), lambda _: spin(6))
    timing = time_callable(step, CPU, TimingSettings(warmup=1, min_repeats=7, min_time_s=0.0))
    forward, backward = timing.phase_samples_ms["forward"], timing.phase_samples_ms["backward"]
    assert len(forward) == len(backward) == timing.n_repeats == 7
    for f, b, total in zip(forward, backward, timing.samples_ms):
        assert f + b == pytest.approx(total, abs=1e-9) and f > 0 and b > 0
    row = timing.as_row()
    assert row["forward_ms_samples"] == forward and row["backward_ms_median"] == pytest.approx(Timing(backward).median_ms)


def test_a_forward_only_step_has_no_backward_columns() -> None:
    timing = time_callable(PhasedStep(lambda: spin(2)), CPU, TimingSettings(warmup=0, min_repeats=3, min_time_s=0.0))
    assert list(timing.phase_samples_ms) == ["forward"] and timing.phase_samples_ms["forward"] == timing.samples_ms
    assert "backward_ms_median" not in timing.as_row() and "forward_ms_median" in timing.as_row()
    assert time_callable(lambda: spin(1), CPU, TimingSettings(warmup=0, min_repeats=2, min_time_s=0.0)).phase_samples_ms == {}


def test_phase_columns_of_samples() -> None:
    row = phase_columns({"forward": [1.0, 3.0, 2.0], "backward": [4.0]})
    assert row["forward_ms_median"] == 2.0 and row["forward_ms_iqr"] == pytest.approx(1.0) and row["backward_ms_iqr"] == 0.0


def backward_alone(step: PhasedStep, calls: int):
    """A callable that runs `step.backward` on the next of `calls` losses computed beforehand (each
    backward needs a graph of its own), so only the backward is timed."""
    losses = iter([step.forward() for _ in range(calls)])
    return lambda: step.backward(next(losses))


def test_the_split_of_a_workload_matches_its_phases_timed_separately() -> None:
    """An attention layer's forward + backward (no sleeps), one torch thread: the phased timing's
    forward and backward medians against the same forward and backward each timed on its own,
    interleaved in rounds so that machine load hits both alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workload = build_workload(tiny_cell("full", seq_len=384, d_model=64), CPU)
        step = workload.step
        settings = TimingSettings(warmup=1, min_repeats=9, min_time_s=0.0)
        phased_f, phased_b, alone_f, alone_b = [], [], [], []
        for _ in range(5):
            timing = time_callable(step, CPU, settings)
            phased_f.append(Timing(timing.phase_samples_ms["forward"]).median_ms)
            phased_b.append(Timing(timing.phase_samples_ms["backward"]).median_ms)
            alone_f.append(time_callable(step.forward, CPU, settings).median_ms)
            alone_b.append(time_callable(backward_alone(step, settings.warmup + 30), CPU, settings).median_ms)
        median = lambda values: sorted(values)[2]  # noqa: E731
        assert median(phased_f) == pytest.approx(median(alone_f), rel=0.3)
        assert median(phased_b) == pytest.approx(median(alone_b), rel=0.3)
        assert median(phased_b) > median(phased_f)  # backward does about twice the forward's work
    finally:
        torch.set_num_threads(threads)
