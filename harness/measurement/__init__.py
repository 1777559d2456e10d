"""Measurement: what happens to one benchmark cell's step inside its own process.

The flow, in the order a cell (harness.cells.benchmark.measure_cell) uses it:

1. `timing`: `set_cpu_threads`, then `time_callable` times the step (warm-up, repeats until
   enough; CUDA events or perf_counter_ns, CPU time per repeat on CPU) into a `Timing`
   (median, IQR, ..., `Timing.as_row`); a `PhasedStep`'s forward and backward apart in each repeat.
   `gpu_timers`: the `kernels` and `graphs` timers of `measure.timer` (CUDA only).
2. `contention`: `time_watched` runs that timing with the machine watched (other processes' CPU
   time, or the GPU's other processes through `nvml`) and re-measures a contended loop
   (`ContentionSettings`, `contention_verdict`, `gpu_contention_verdict`).
3. `memory`: `measure_peak_memory` runs the step once more for its peak above the memory held
   before it (CUDA allocator, VmHWM; `freed_memory_returned` keeps glibc's heap honest);
   `is_oom_error` says whether a failure was an out-of-memory one.
4. `floor`: `matmul_rate`, the device's sustained matmul GFLOP/s in the cell's dtype (the compute
   floor and roof), when the suite asks for it; `bandwidth`: `measure_bandwidth`, the streaming
   memory bandwidth in GB/s (the memory roof).
5. `nvml`: `nvml_snapshot` (clocks, temperature, power) before and after, on CUDA.

The names below are the package's public API; callers import them from `harness.measurement`.
"""

from harness.measurement.bandwidth import BandwidthReading, measure_bandwidth
from harness.measurement.contention import (
    GPU_SLOWDOWN_REASONS,
    ContentionSettings,
    MachineLoad,
    MachineSnapshot,
    contention_verdict,
    gpu_contention_verdict,
    machine_load,
    machine_snapshot,
    time_watched,
)
from harness.measurement.floor import DTYPES, MatmulReading, matmul_rate, measure_matmul
from harness.measurement.gpu_timers import CUDA_ONLY_TIMERS, TIMER_SETTING, TIMERS, GraphCaptureError, time_step
from harness.measurement.memory import (
    MemoryReading,
    freed_memory_returned,
    is_oom_error,
    measure_peak_memory,
    read_proc_status_kib,
    release_free_heap,
)
from harness.measurement.nvml import gpu_load_snapshot, nvml_device, nvml_snapshot
from harness.measurement.timing import (
    PHASE_COLUMNS,
    PhasedStep,
    Timing,
    TimingSettings,
    median_of,
    phase_columns,
    set_cpu_threads,
    time_callable,
    usable_cores,
)

__all__ = [
    "CUDA_ONLY_TIMERS",
    "GraphCaptureError",
    "TIMERS",
    "TIMER_SETTING",
    "BandwidthReading",
    "DTYPES",
    "GPU_SLOWDOWN_REASONS",
    "ContentionSettings",
    "MachineLoad",
    "MachineSnapshot",
    "MatmulReading",
    "MemoryReading",
    "PHASE_COLUMNS",
    "PhasedStep",
    "Timing",
    "TimingSettings",
    "contention_verdict",
    "freed_memory_returned",
    "gpu_contention_verdict",
    "gpu_load_snapshot",
    "is_oom_error",
    "machine_load",
    "machine_snapshot",
    "matmul_rate",
    "measure_bandwidth",
    "measure_matmul",
    "measure_peak_memory",
    "median_of",
    "phase_columns",
    "nvml_device",
    "nvml_snapshot",
    "read_proc_status_kib",
    "release_free_heap",
    "set_cpu_threads",
    "time_callable",
    "time_step",
    "time_watched",
    "usable_cores",
]
