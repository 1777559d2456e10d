"""Which code runs LSH attention's core: the `backend` argument of `lsh_attention` and the `lsh` variant.

- `ops`: PyTorch ops (`LSHCore` in variants/attention/lsh_core.py), any device and dtype: the reference;
- `cpu_kernel`: the fused C kernel (variants/attention/lsh_cpu.py): float32 CPU tensors (with
  dup_correction it hashes and sorts, the ops core attends);
- `triton`: the Triton kernels (variants/attention/lsh_triton.py): CUDA, or CPU tensors under
  TRITON_INTERPRET=1; dup_correction falls back to the ops core;
- `auto`: the CPU kernel for float32 CPU tensors, Triton on CUDA when triton is installed, imports and
  the shape suits it, the ops path otherwise.

`resolve_backend` says which one runs (what rows record in `attention_backend`); a backend asked for
by name that cannot run here raises VariantUnavailable (a benchmark cell becomes `skipped`).
"""

from __future__ import annotations

import torch

import variants.attention.lsh_cpu as lsh_cpu
import variants.attention.lsh_triton as lsh_triton
from variants.registry import VariantUnavailable

BACKENDS = ("auto", "ops", "cpu_kernel", "triton")
DUP_FALLBACK = " (dup_correction: ops core)"  # appended to the recorded backend when the ops core runs instead


def check_backend_name(backend: str) -> None:
    """ValueError for a backend name that is not one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype, *, head_dim: int, bucket_size: int, dup_correction: bool = False
) -> str:
    """The backend that runs for tensors of this device and dtype: 'ops', 'cpu_kernel' or 'triton',
    with DUP_FALLBACK appended where dup_correction sends a kernel backend's core to the ops path.

    Raises VariantUnavailable when `backend` names one that cannot run here (the message says why).
    """
    check_backend_name(backend)
    if backend == "auto":
        if lsh_cpu.available(device, dtype):
            backend = "cpu_kernel"
        elif (
            device.type == "cuda"
            and lsh_triton.installed_version()
            and not lsh_triton.unsupported(head_dim, bucket_size, dtype)
            and lsh_triton.import_error() is None
        ):
            backend = "triton"
        else:
            return "ops"
    if backend == "cpu_kernel" and not lsh_cpu.available(device, dtype):
        raise VariantUnavailable(f"lsh backend 'cpu_kernel' runs on float32 CPU tensors with the kernel built ({lsh_cpu.status()})")
    if backend == "triton":
        lsh_triton.check_usable(device, head_dim, bucket_size, dtype)
    return backend + DUP_FALLBACK if dup_correction and backend != "ops" else backend
