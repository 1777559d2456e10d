"""harness.measurement.nvml: NVML snapshots are {} without a GPU, without pynvml and with a broken
NVML, carry the schema's NVML fields in their units from a stand-in NVML, and carry clocks on a GPU."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from harness.measurement import nvml_snapshot
from harness.store.schema import NVML_FIELDS

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_nvml_snapshot_without_gpu_is_empty() -> None:
    assert nvml_snapshot() == {}
    assert nvml_snapshot(3) == {}


def test_nvml_snapshot_without_pynvml_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    assert nvml_snapshot() == {}


def test_nvml_snapshot_never_raises_on_broken_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def __getattr__(self, name: str):
            raise RuntimeError("driver exploded")

    monkeypatch.setitem(sys.modules, "pynvml", Broken())
    assert nvml_snapshot() == {}


@needs_cuda
def test_nvml_snapshot_on_gpu_has_clocks() -> None:
    snap = nvml_snapshot(0)
    if not snap:
        pytest.skip("NVML not usable here")
    assert snap["sm_clock_mhz"] > 0 and snap["temperature_c"] > 0
    assert snap["power_limit_w"] > 0


def test_nvml_snapshot_reads_every_schema_field_in_its_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in NVML answering in its own units (mW for power): the snapshot holds exactly the
    schema's NVML_FIELDS (the rows' nvml_before_* / nvml_after_* columns), power in W."""
    sm, mem, temperature = 0, 2, 0
    fake = types.SimpleNamespace(
        NVML_CLOCK_SM=sm,
        NVML_CLOCK_MEM=mem,
        NVML_TEMPERATURE_GPU=temperature,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: f"gpu{index}",
        nvmlDeviceGetClockInfo=lambda handle, clock: {sm: 1410, mem: 1593}[clock],
        nvmlDeviceGetMaxClockInfo=lambda handle, clock: 1980,
        nvmlDeviceGetTemperature=lambda handle, sensor: 61,
        nvmlDeviceGetPowerUsage=lambda handle: 312_500,  # mW
        nvmlDeviceGetEnforcedPowerLimit=lambda handle: 700_000,  # mW
        nvmlDeviceGetCurrentClocksEventReasons=lambda handle: 0x4,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    snap = nvml_snapshot(0)
    assert list(snap) == list(NVML_FIELDS)
    assert snap == {
        "sm_clock_mhz": 1410,
        "sm_clock_max_mhz": 1980,
        "mem_clock_mhz": 1593,
        "temperature_c": 61,
        "power_w": 312.5,
        "power_limit_w": 700.0,
        "throttle_reasons": 4,
    }
