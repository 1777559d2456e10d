"""NVML readings of a GPU: clocks, temperature and power (`nvml_snapshot`, recorded before and after
a CUDA cell's timing and in the run environment) and the other processes on it (`gpu_load_snapshot`,
for the contention rule). NVML is optional (nvidia-ml-py): without it, or without a GPU, every
reading is {} and nothing raises.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from harness.store.schema import GPU_OTHER_PROCESSES, GPU_OTHER_SM_UTIL_PCT


@contextmanager
def nvml_device(device_index: int = 0) -> Iterator[tuple[Any, Any] | None]:
    """(pynvml, handle of CUDA device `device_index`) with NVML initialised for the block and shut
    down after it; None when NVML or the device is unavailable. Errors inside the block propagate
    only as far as the caller's own probes let them: the NVML shutdown always runs."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        yield None
        return
    try:
        try:
            handle = _nvml_handle(pynvml, device_index)
        except Exception:
            handle = None
        yield (pynvml, handle) if handle is not None else None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _nvml_handle(pynvml, device_index: int):
    """NVML handle for CUDA device ``device_index``.

    NVML ignores CUDA_VISIBLE_DEVICES, so CUDA index i is translated through it (by
    UUID when torch has already initialised CUDA, else through the variable's entries).
    """
    if torch.cuda.is_initialized():
        try:
            uuid = str(torch.cuda.get_device_properties(device_index).uuid)
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        except Exception:
            pass  # older torch without .uuid, or a MIG slice: fall back to the variable
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        entry = entries[device_index]
        if entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
        return pynvml.nvmlDeviceGetHandleByUUID(entry)
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


def _clock_event_reasons(pynvml, handle) -> int:
    # Renamed from ...ThrottleReasons to ...EventReasons in newer NVML bindings.
    getter = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return int(getter(handle))


def nvml_snapshot(device_index: int = 0) -> dict:
    """Clocks (MHz), temperature (C) and power (W) of a GPU via NVML; {} when unavailable.

    Keys: sm_clock_mhz, sm_clock_max_mhz, mem_clock_mhz, temperature_c, power_w,
    power_limit_w, throttle_reasons (NVML bitmask). A field NVML refuses is left out.
    Never raises.
    """
    snap: dict = {}
    with nvml_device(device_index) as opened:
        if opened is None:
            return {}
        pynvml, handle = opened
        probes = {
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
            "throttle_reasons": lambda: _clock_event_reasons(pynvml, handle),
        }
        for key, probe in probes.items():
            try:
                snap[key] = probe()
            except Exception:
                pass
    return snap


def gpu_load_snapshot(device_index: int = 0, since_us: int | None = None) -> dict[str, Any]:
    """Other processes on a GPU via NVML; {} when NVML is unavailable. Never raises.

    Keys: `gpu_other_processes` (compute processes other than this one; NVML reports host pids, so
    inside a PID namespace, where this process's pid is not among them, one of them is taken to be
    this process once it has initialised CUDA), `gpu_other_sm_util_pct` (the highest SM utilisation
    NVML sampled for any other pid since `since_us`, microseconds since the epoch; absent where NVML
    cannot tell, e.g. MIG) and `throttle_reasons` (the clock-event bitmask now).
    """
    snap: dict[str, Any] = {}
    with nvml_device(device_index) as opened:
        if opened is None:
            return {}
        pynvml, handle = opened
        me = os.getpid()
        try:
            pids = [int(p.pid) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        except Exception:
            return snap  # NVML cannot list processes here: nothing to say
        ours_unlisted = me not in pids and torch.cuda.is_initialized()
        others = [p for p in pids if p != me]
        snap[GPU_OTHER_PROCESSES] = max(0, len(others) - (1 if ours_unlisted else 0))
        try:
            samples = pynvml.nvmlDeviceGetProcessUtilization(handle, int(since_us or 0))
            other_util = [float(s.smUtil) for s in samples if int(s.pid) != me]
            if not ours_unlisted:  # else our own samples cannot be told apart: leave it unknown
                snap[GPU_OTHER_SM_UTIL_PCT] = max(other_util, default=0.0)
        except Exception:
            pass  # not supported here: the process count stands alone
        try:
            snap["throttle_reasons"] = _clock_event_reasons(pynvml, handle)
        except Exception:
            pass
    return snap
