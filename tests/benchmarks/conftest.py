"""pytest-benchmark set-up for the kernel micro-benchmarks in this folder.

They are skipped in the normal test run (`addopts = "--benchmark-skip"` in pyproject.toml) and
run with `pytest tests/benchmarks --benchmark-only` (which overrides --benchmark-skip); see
docs/benchmarks.md for saving and comparing results. On a GPU the timer synchronises CUDA before
reading the clock, so a round measures the GPU work and not just its launch.
"""

from __future__ import annotations

import time

import pytest
import torch


def synchronized_timer() -> float:
    """time.perf_counter after torch.cuda.synchronize() (when CUDA is initialised): pytest-benchmark
    calls the timer before and after each round, so queued GPU work is inside the measurement."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def pytest_collection_modifyitems(config, items) -> None:
    """Benchmarks in this folder use the synchronising timer and run with the GC off."""
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()) and "tests/benchmarks/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.benchmark(timer=synchronized_timer, disable_gc=True))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def seq_len(device: torch.device) -> int:
    """Sequence length of the benchmarks: long on a GPU, short enough for a 2-core CPU."""
    return 4096 if device.type == "cuda" else 256


def _gpu_info() -> dict:
    if not torch.cuda.is_available():
        return {"gpu": None}
    info = {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            info["gpu_driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML (or no permission): the driver is simply not recorded
        info["gpu_driver"] = None
    return info


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Add GPU name, driver, CUDA and torch (with its thread count) to the saved machine info, so
    `--benchmark-compare` warns when comparing results from different hardware or software."""
    machine_info.update(_gpu_info())
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
