"""harness.measurement.nvml: NVML snapshots are {} without a GPU, without pynvml and with a broken
NVML, and carry clocks on a GPU."""

from __future__ import annotations

import sys

import pytest
import torch

from harness.measurement import nvml_snapshot

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
