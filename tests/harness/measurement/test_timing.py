"""harness.measurement.timing: the Timing statistics against hand-computed values, time_callable
against calls of known length (sleeps; on CUDA, GPU spins), the repeat rules, the thread count."""

from __future__ import annotations

import time

import pytest
import torch

from harness.measurement import Timing, TimingSettings, set_cpu_threads, time_callable

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class CountingSleep:
    """Callable that sleeps a fixed time per call (cycling through ``durations_s``)."""

    def __init__(self, *durations_s: float) -> None:
        self.durations_s = durations_s
        self.calls = 0

    def __call__(self) -> None:
        time.sleep(self.durations_s[self.calls % len(self.durations_s)])
        self.calls += 1


# --------------------------------------------------------------------------- Timing


def test_timing_statistics_match_known_values() -> None:
    t = Timing([5.0, 1.0, 4.0, 2.0, 3.0])
    assert t.median_ms == 3.0
    assert t.iqr_ms == pytest.approx(2.0)  # p75=4, p25=2 (linear interpolation)
    assert (t.min_ms, t.max_ms, t.mean_ms, t.n_repeats) == (1.0, 5.0, 3.0, 5)
    assert t.samples_ms == [5.0, 1.0, 4.0, 2.0, 3.0]  # order kept


def test_noisy_flag_threshold() -> None:
    assert not Timing([10.0] * 8).noisy
    assert Timing([10.0, 10.0, 10.0, 20.0, 20.0, 20.0]).noisy  # bimodal
    assert not Timing([9.6, 9.8, 10.0, 10.2, 10.4]).noisy  # iqr 0.4 / 10 = 0.04
    assert Timing([8.0, 9.0, 10.0, 11.5, 13.0]).noisy  # iqr 2.5 / 10 = 0.25
    assert Timing([4.0]).iqr_ms == 0.0 and not Timing([4.0]).noisy


def test_as_row_keys_and_types() -> None:
    row = Timing([1.0, 2.0, 3.0], timer="cuda_event").as_row()
    assert set(row) == {
        "time_ms_median",
        "time_ms_iqr",
        "time_ms_min",
        "time_ms_max",
        "time_ms_mean",
        "time_ms_samples",
        "n_repeats",
        "time_noisy",
        "timer",
    }
    assert row["time_ms_samples"] == [1.0, 2.0, 3.0]
    assert row["n_repeats"] == 3 and row["timer"] == "cuda_event"
    assert isinstance(row["time_noisy"], bool)


# --------------------------------------------------------------------------- time_callable


def test_sleep_20ms_median_and_warmup_not_counted() -> None:
    fn = CountingSleep(0.020)
    settings = TimingSettings(warmup=3, min_repeats=6, min_time_s=0.0)
    t = time_callable(fn, CPU, settings)
    assert t.timer == "perf_counter_ns"
    assert t.n_repeats == 6 == len(t.samples_ms)
    assert fn.calls == 3 + 6
    assert t.median_ms == pytest.approx(20.0, rel=0.15)
    assert min(t.samples_ms) >= 19.9  # sleep never returns early


def test_warmup_calls_are_not_timed() -> None:
    # The first (warm-up) call is slow; the timed ones must not include it.
    fn = CountingSleep(0.200, 0.001, 0.001, 0.001, 0.001, 0.001)
    t = time_callable(fn, CPU, TimingSettings(warmup=1, min_repeats=5, min_time_s=0.0))
    assert fn.calls == 6 and t.n_repeats == 5
    assert t.max_ms < 100.0


def test_min_time_keeps_repeating_past_min_repeats() -> None:
    fn = CountingSleep(0.010)
    t = time_callable(fn, CPU, TimingSettings(warmup=0, min_repeats=2, min_time_s=0.15))
    assert t.n_repeats >= 8  # ~15 calls of >= 10 ms fill 0.15 s; 2 would be the min_repeats alone
    assert sum(t.samples_ms) >= 140.0
    assert fn.calls == t.n_repeats


def test_max_repeats_caps_min_time() -> None:
    t = time_callable(CountingSleep(0.001), CPU, TimingSettings(warmup=0, min_repeats=2, min_time_s=60.0, max_repeats=4))
    assert t.n_repeats == 4


def test_max_time_caps_min_repeats_but_keeps_one() -> None:
    t = time_callable(CountingSleep(0.010), CPU, TimingSettings(warmup=0, min_repeats=1000, min_time_s=0.0, max_time_s=0.05))
    assert 1 <= t.n_repeats < 20
    t = time_callable(CountingSleep(0.001), CPU, TimingSettings(warmup=0, min_repeats=5, min_time_s=0.0, max_time_s=0.0))
    assert t.n_repeats == 1


def test_bimodal_durations_flagged_noisy() -> None:
    t = time_callable(CountingSleep(0.002, 0.020), CPU, TimingSettings(warmup=0, min_repeats=10, min_time_s=0.0))
    assert t.n_repeats == 10
    assert t.noisy and t.as_row()["time_noisy"] is True


@needs_cuda
@pytest.mark.parametrize("flush_l2", [False, True])
def test_cuda_timer_scales_with_gpu_work(flush_l2: bool) -> None:
    # torch.cuda._sleep spins the GPU for N cycles and returns to the host at once: only a
    # GPU-side timer sees it, and twice the cycles must read about twice the time.
    dev = torch.device("cuda")
    settings = TimingSettings(warmup=1, min_repeats=5, min_time_s=0.0, flush_l2=flush_l2)
    short = time_callable(lambda: torch.cuda._sleep(1_000_000), dev, settings)
    long = time_callable(lambda: torch.cuda._sleep(2_000_000), dev, settings)
    assert short.timer == "cuda_event" and short.n_repeats == 5
    assert short.median_ms > 0.05
    assert long.median_ms / short.median_ms == pytest.approx(2.0, rel=0.15)


def test_set_cpu_threads_sets_and_reports() -> None:
    original = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1 == torch.get_num_threads()
        assert set_cpu_threads(None) == 1
        with pytest.raises(ValueError):
            set_cpu_threads(0)
    finally:
        torch.set_num_threads(original)
