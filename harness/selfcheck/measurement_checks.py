"""`device`, `timer`, `gpu_timers`, `peak_memory`, `nvml`: the measurement machinery (harness.measurement) against
known quantities: a busy wait of known length, CUDA work that doubles, a known allocation, NVML."""

from __future__ import annotations

import os
import time
from functools import partial

import torch

from harness.environment import capture_environment, device_name
from harness.measurement import (
    CUDA_ONLY_TIMERS,
    TIMERS,
    PhasedStep,
    TimingSettings,
    measure_peak_memory,
    nvml_snapshot,
    time_callable,
    time_step,
)
from harness.selfcheck.framework import Context, Outcome, Skip, first_line
from harness.units import MIB
from variants.registry import backends as variant_backends


def check_device(context: Context) -> Outcome:
    """The device runs a kernel; what it is (CUDA: name, capability, memory, CUDA_VISIBLE_DEVICES)."""
    device = context.device
    value = (torch.arange(4, device=device, dtype=torch.float32) * 2).sum().item()
    if value != 12.0:
        return Outcome("FAIL", f"2 * (0 + 1 + 2 + 3) gave {value} on {device}, not 12")
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        detail = (
            f"{properties.name} sm_{properties.major}{properties.minor} {properties.total_memory / 2**30:.1f} GiB, "
            f"{torch.cuda.device_count()} visible (CUDA_VISIBLE_DEVICES={visible}), "
            f"torch {torch.__version__} CUDA {torch.version.cuda}"
        )
        return Outcome("PASS", detail, {"name": properties.name, "visible": visible, "count": torch.cuda.device_count()})
    backends = variant_backends()
    detail = f"{device_name('cpu')}, {torch.get_num_threads()} threads, torch {torch.__version__}; " + "; ".join(
        f"{k}: {v}" for k, v in backends.items()
    )
    return Outcome("PASS", detail[:300], {"backends": backends})


def busy_wait(seconds: float) -> None:
    """Spin (no sleep) until time.monotonic has advanced `seconds`: a CPU call of known length."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def check_timer(context: Context) -> Outcome:
    """CPU: perf_counter_ns times a 10 ms busy wait as 10-15 ms. CUDA: CUDA-event times of a train of
    matmuls lie within the synchronised wall time of the same calls, and double with twice the matmuls."""
    repeats = 5 if context.quick else 15
    settings = TimingSettings(warmup=1, min_repeats=repeats, max_repeats=repeats, min_time_s=0.0)
    if context.device.type != "cuda":
        known_ms = 10.0
        timing = time_callable(partial(busy_wait, known_ms / 1e3), context.device, settings)
        data = dict(timer=timing.timer, known_ms=known_ms, median_ms=timing.median_ms, min_ms=timing.min_ms)
        detail = f"{timing.timer}: {known_ms:g} ms busy wait timed {timing.min_ms:.2f}-{timing.median_ms:.2f} ms (min-median)"
        ok = timing.timer == "perf_counter_ns" and known_ms <= timing.min_ms and timing.median_ms <= 1.5 * known_ms
        return Outcome("PASS" if ok else "FAIL", detail + ("" if ok else f"; expected {known_ms:g}-{1.5 * known_ms:g} ms"), data)
    return cuda_timer(context.device, settings)


def cuda_timer(device: torch.device, settings: TimingSettings) -> Outcome:
    """The CUDA half of `check_timer`: CUDA-event times of a train of [2048, 2048] matmuls (>= 10 ms) against
    the synchronised wall time of the same calls, and twice the matmuls against twice the time."""
    a = torch.randn(2048, 2048, device=device)
    b, c = torch.randn_like(a), torch.empty_like(a)

    def matmuls(n: int) -> None:
        for _ in range(n):
            torch.mm(a, b, out=c)

    count = 1
    while count < 4096 and time_callable(partial(matmuls, count), device, settings).median_ms < 10.0:
        count *= 2  # a train of >= 10 ms, so launch gaps are a small part of it
    single = time_callable(partial(matmuls, count), device, settings)
    double = time_callable(partial(matmuls, 2 * count), device, settings)
    walls = []
    for _ in range(settings.min_repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        matmuls(count)
        torch.cuda.synchronize(device)
        walls.append((time.perf_counter() - start) * 1e3)
    wall_ms = sorted(walls)[len(walls) // 2]
    ratio = double.median_ms / single.median_ms
    tflops = 2 * 2048**3 * count / (single.median_ms / 1e3) / 1e12
    data = dict(
        timer=single.timer,
        matmuls=count,
        event_ms=single.median_ms,
        wall_ms=wall_ms,
        double_ratio=ratio,
        tflops=tflops,
    )
    detail = (
        f"{single.timer}: {count} matmuls 2048^2 {single.median_ms:.2f} ms (wall {wall_ms:.2f} ms, "
        f"{tflops:.1f} TFLOP/s), twice as many x{ratio:.2f}"
    )
    ok = single.timer == "cuda_event" and 0.7 * wall_ms <= single.median_ms <= 1.02 * wall_ms + 0.05 and 1.8 <= ratio <= 2.2
    return Outcome("PASS" if ok else "FAIL", detail + ("" if ok else "; expected events within 70-102% of wall, x1.8-2.2"), data)


def check_peak_memory(context: Context) -> Outcome:
    """The probe reads a known allocation: CUDA allocator peak of 64 MiB kept + 32 MiB transient = 96 MiB
    exactly; CPU VmHWM of 64 MiB written (within +24 MiB of overhead)."""
    device = context.device
    if device.type == "cuda":

        def allocate() -> torch.Tensor:
            transient = torch.empty(32 * MIB, dtype=torch.uint8, device=device)
            kept = torch.empty(64 * MIB, dtype=torch.uint8, device=device)
            del transient
            return kept

        reading = measure_peak_memory(allocate, device)
        ok = abs(reading.peak_mib - 96.0) < 0.5
        detail = f"{reading.method}: 64 MiB kept + 32 MiB transient read {reading.peak_mib:.2f} MiB (expected 96)"
        return Outcome("PASS" if ok else "FAIL", detail, {"peak_mib": reading.peak_mib, "method": reading.method})
    reading = measure_peak_memory(lambda: torch.ones(64 * MIB, dtype=torch.uint8), device)
    detail = f"{reading.method}: 64 MiB written read {reading.peak_mib:.1f} MiB (expected 64-88)"
    data = {"peak_mib": reading.peak_mib, "method": reading.method}
    if reading.peak_mib != reading.peak_mib:
        raise Skip(f"{reading.method}: this kernel cannot reset VmHWM (/proc/self/clear_refs), so no CPU peak is observable")
    return Outcome("PASS" if 64.0 <= reading.peak_mib <= 88.0 else "FAIL", detail, data)


def check_nvml(context: Context) -> Outcome:
    """NVML answers for the device: driver version, SM clock and temperature (as every CUDA run records)."""
    if context.device.type != "cuda":
        snapshot = nvml_snapshot(0)  # must not raise on a machine without a GPU
        raise Skip(f"device {context.device.type}: no GPU to query (nvml_snapshot gave {snapshot or '{}'}); runs with --device cuda")
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception as error:  # not installed, or no driver behind it
        raise Skip(f"NVML unavailable ({type(error).__name__}: {first_line(error)}); pip install nvidia-ml-py") from None
    environment = capture_environment(str(context.device))
    snapshot = environment.get("nvml") or {}
    driver = environment.get("gpu_driver")
    missing = [k for k in ("sm_clock_mhz", "temperature_c") if k not in snapshot] + ([] if driver else ["driver"])
    detail = (
        f"driver {driver}, SM {snapshot.get('sm_clock_mhz')}/{snapshot.get('sm_clock_max_mhz')} MHz, "
        f"{snapshot.get('temperature_c')} C, {snapshot.get('power_w')} W"
    )
    data = {"driver": driver, "nvml": snapshot}
    return Outcome("FAIL" if missing else "PASS", detail + (f"; missing {', '.join(missing)}" if missing else ""), data)


def check_gpu_timers(context: Context) -> Outcome:
    """CUDA: `measure.timer` kernels and graphs against events on a known kernel, a back-to-back train
    of [2048, 2048] matmuls timed as a forward (the train) and a backward (one more matmul): kernel
    time within 90-102% of event time (the train leaves the GPU no gaps, and kernel time cannot
    exceed it), graph replays within 80-110%, every phase timed. CPU: both are refused (ValueError),
    and the check is skipped."""
    settings = TimingSettings(warmup=2, min_repeats=5 if context.quick else 15, min_time_s=0.0)
    if context.device.type != "cuda":
        refused = []
        for timer in CUDA_ONLY_TIMERS:
            try:
                time_step(lambda: None, context.device, settings, timer)
            except ValueError:
                refused.append(timer)
        if refused != list(CUDA_ONLY_TIMERS):
            return Outcome("FAIL", f"on {context.device.type} the timers {set(CUDA_ONLY_TIMERS) - set(refused)} were not refused")
        raise Skip(f"device {context.device.type}: kernels and graphs are refused here (CUDA only); runs with --device cuda")
    a = torch.randn(2048, 2048, device=context.device)
    b, c = torch.randn_like(a), torch.empty_like(a)

    def train() -> torch.Tensor:
        for _ in range(8):
            torch.mm(a, b, out=c)
        return c

    step = PhasedStep(train, lambda out: torch.mm(out, b))
    readings = {timer: time_step(step, context.device, settings, timer) for timer in TIMERS}
    events, kernels, graphs = (readings[t].median_ms for t in TIMERS)
    phases = all(len(readings[t].phase_samples_ms.get(p, [])) == readings[t].n_repeats for t in TIMERS for p in ("forward", "backward"))
    data = {f"{t}_ms": readings[t].median_ms for t in TIMERS} | {f"{t}_timer": readings[t].timer for t in TIMERS}
    detail = (
        f"9 matmuls 2048^2: events {events:.3f} ms, kernels {kernels:.3f} ms ({kernels / events:.1%}), "
        f"graphs {graphs:.3f} ms ({graphs / events:.1%})"
    )
    ok = 0.9 * events <= kernels <= 1.02 * events and 0.8 * events <= graphs <= 1.1 * events and phases
    return Outcome(
        "PASS" if ok else "FAIL",
        detail + ("" if ok else "; expected kernels 90-102% and graphs 80-110% of events, every phase timed"),
        data,
    )
