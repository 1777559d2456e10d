"""harness.measurement_checks.measurement_checks: the timer and peak-memory checks against a known busy wait and
a known allocation, failing a wrong timer and a wrong reading; NVML skips on CPU."""

from __future__ import annotations

import pytest

from harness.measurement import MemoryReading, Timing
from harness.selfcheck import measurement_checks
from harness.selfcheck.framework import Skip


def test_timer_check_times_a_known_busy_wait_and_fails_a_wrong_timer(cpu_context, monkeypatch):
    outcome = measurement_checks.check_timer(cpu_context)
    assert outcome.status == "PASS", outcome.detail
    assert 10.0 <= outcome.data["min_ms"] and outcome.data["median_ms"] <= 15.0
    real = measurement_checks.time_callable
    monkeypatch.setattr(measurement_checks, "time_callable", lambda *a, **k: Timing([s / 2 for s in real(*a, **k).samples_ms]))
    assert measurement_checks.check_timer(cpu_context).status == "FAIL"


def test_peak_memory_check_reads_a_known_allocation_and_fails_a_wrong_reading(cpu_context, monkeypatch):
    outcome = measurement_checks.check_peak_memory(cpu_context)
    assert outcome.status == "PASS", outcome.detail
    assert 64.0 <= outcome.data["peak_mib"] <= 88.0  # 64 MiB written, plus allocator and page-table slack
    monkeypatch.setattr(measurement_checks, "measure_peak_memory", lambda fn, device: MemoryReading(32.0, None, "vmhwm_clear_refs"))
    assert measurement_checks.check_peak_memory(cpu_context).status == "FAIL"


def test_nvml_check_skips_on_cpu_with_its_reason(cpu_context):
    with pytest.raises(Skip, match="--device cuda"):
        measurement_checks.check_nvml(cpu_context)
