"""Triton kernels for the core of LSH attention (the `triton` backend of `lsh_attention`).

The same quantities as `LSHCore` (variants/attention/lsh_core.py, the reference and fallback), for the
items sorted by (round-offset bucket, position): chunk g of the combined order attends to chunks
g - 1 (cyclically, across rounds) and g; keys are the length-normalised qk rows; causal masking by
original position (mask value), then the self logit set to the self penalty (`mask_values`); the
rounds combined with weights softmax_r(lse_r). Design (docs/lsh.md has the FLOPs and bytes):

- Every kernel reads its rows of the packed [B * L * H, 2d] (qk | v) table through the sort index
  [BH, N] (N = n_hashes * L) inside the kernel: row = ((b * L + item % L) * H + h); no permuted
  copy of qk or v exists, nor a look-back copy (the window's keys are sorted indices
  g*c - c .. g*c + c, modulo N).
- Forward in two passes over the same tiles: pass 0 keeps each item's row max m and row sum l
  (online over the window's key blocks); the round weights w = softmax_r(m + log l) are computed
  per position on [BH, N] floats; pass 1 recomputes the logits and adds w P V straight onto the
  positions' output rows (fp32 atomics: n_hashes adds per row). So no [n_hashes * L, d]
  per-round output buffer exists; the price is one more q . k per tile.
- Saved for the backward: m and w / l per item (two floats), the sort index and the output.
  Never the [BH, N, 2c] probabilities.
- Backward, one program per block of queries: recompute P, then dS = w P (dY . v - dY . Y); dq
  for the block's queries, dk (mapped through the key normalisation in the kernel) and dv for its
  window's keys, all added onto positions with fp32 atomics. Atomics rather than a sorted-order
  write plus one unsort: the unsort would need an [n_hashes * L, 2d] buffer (at 32K tokens and 8
  rounds as large as everything else in the layer) and a second pass; each position receives
  only 3 * n_hashes additions, so contention is low. The order of those additions varies, so the
  last bits of the gradients vary between runs (as with the ops path's index_add_ on CUDA).

Tiles: blocks of min(bucket_size, 64) queries and keys; bucket_size and head_dim must be powers of
two >= 16 (`tl.dot`). Inputs float32 / bfloat16 / float16, accumulation float32; float32 tiles
multiply in full precision unless torch.backends.cuda.matmul.allow_tf32 lets the ops path's
matmuls use TF32 too. On CPU tensors
the kernels run in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before
they are first used.
"""

from __future__ import annotations

import math
import os
from importlib import metadata
from typing import Any

import torch
from torch.profiler import record_function

from variants.attention.full import mask_values
from variants.registry import VariantUnavailable

INTERPRET_ENV = "TRITON_INTERPRET"
MAX_BLOCK = 64  # query / key rows per tile
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_kernels: dict[str, Any] = {}


def installed_version() -> str | None:
    """triton's installed version, without importing it (None when it is not installed)."""
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None


def import_error() -> str | None:
    """Why triton, installed or not, cannot be imported here ("ImportError: ..."); None when it imports."""
    try:
        import triton  # noqa: F401
    except Exception as error:  # a triton built for another torch / CUDA fails in many ways
        return f"{type(error).__name__}: {error}"
    return None


def status() -> str:
    """One line for the run environment: whether and where the Triton kernels can run here."""
    version = installed_version()
    if version is None:
        return "not installed (pip install '.[gpu]'): lsh backend 'auto' uses the ops path on CUDA"
    where = "used by lsh backend 'auto' on CUDA tensors"
    if os.environ.get(INTERPRET_ENV) == "1":
        where += f"; {INTERPRET_ENV}=1: runs on CPU tensors in the interpreter"
    return f"triton {version}, {where}"


def unsupported(head_dim: int, bucket_size: int, dtype: torch.dtype) -> str | None:
    """Why the kernels cannot take this shape or dtype (None when they can)."""
    if dtype not in DTYPES:
        return f"dtype {dtype} (the Triton kernels take float32, bfloat16, float16)"
    for name, value in (("head_dim", head_dim), ("bucket_size", bucket_size)):
        if value < 16 or value & (value - 1):
            return f"{name}={value} (the Triton kernels need a power of two >= 16)"
    return None


def check_usable(device: torch.device, head_dim: int, bucket_size: int, dtype: torch.dtype) -> None:
    """Raise VariantUnavailable saying why the kernels cannot run for these tensors here."""
    if installed_version() is None:
        raise VariantUnavailable("lsh backend 'triton' needs the triton package (pip install '.[gpu]')")
    broken = import_error()
    if broken:
        raise VariantUnavailable(f"lsh backend 'triton': triton {installed_version()} is installed but does not import ({broken})")
    reason = unsupported(head_dim, bucket_size, dtype)
    if reason:
        raise VariantUnavailable(f"lsh backend 'triton' cannot run {reason}")
    if device.type == "cpu":
        if not _get_kernels()["interpreted"]:
            raise VariantUnavailable(
                f"lsh backend 'triton' on CPU tensors runs in Triton's interpreter: set {INTERPRET_ENV}=1 before the first call"
            )
    elif device.type != "cuda":
        raise VariantUnavailable(f"lsh backend 'triton' runs on CUDA (or CPU under {INTERPRET_ENV}=1), not on {device.type}")


def _get_kernels() -> dict[str, Any]:
    """The jitted kernels, built on first use (so TRITON_INTERPRET is read then, not at import)."""
    if not _kernels:
        import triton  # noqa: F401  (an ImportError here means triton is broken, not missing)

        from variants.attention import lsh_triton_kernels as source

        _kernels.update(
            forward=triton.jit(source.forward_kernel),
            backward=triton.jit(source.backward_kernel),
            hash=triton.jit(source.hash_kernel),
            interpreted=os.environ.get(INTERPRET_ENV) == "1",
        )
    return _kernels


def _block(chunk: int) -> int:
    return min(chunk, MAX_BLOCK)


def _launch_common(table: torch.Tensor, sort_idx: torch.Tensor, seq_len: int, heads: int, chunk: int, causal: bool) -> dict:
    mask_value, self_value = mask_values(table.dtype)
    block = _block(chunk)
    return dict(
        n_items=sort_idx.shape[1],
        seq_len=seq_len,
        heads=heads,
        mask_value=mask_value,
        self_value=self_value,
        CHUNK=chunk,
        D=table.shape[1] // 2,
        BLOCK_M=block,
        BLOCK_N=block,
        CAUSAL=causal,
        num_warps=8 if table.shape[1] // 2 >= 128 else 4,  # head_dim 128: [64, 128] fp32 accumulators
        PRECISION=_precision(table.dtype),
    )


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for float32 tiles: TF32 only where torch's own CUDA matmuls may use it."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def round_weights(lse: torch.Tensor, sort_idx: torch.Tensor, n_hashes: int) -> torch.Tensor:
    """Each item's round weight w = softmax over its position's rounds of lse: [BH, N] in sorted order.

    lse [BH, N] (sorted order), sort_idx [BH, N] item id (r * L + position) of each sorted index.
    Normalised by the sum, as the ops path does.
    """
    if n_hashes == 1:
        return torch.ones_like(lse)
    bh, n_items = lse.shape
    per_round = torch.empty_like(lse).scatter_(1, sort_idx, lse).view(bh, n_hashes, n_items // n_hashes)
    per_round = torch.exp(per_round - per_round.amax(dim=1, keepdim=True))
    per_round /= per_round.sum(dim=1, keepdim=True)
    return per_round.view(bh, n_items).gather(1, sort_idx)


class TritonLSHCore(torch.autograd.Function):
    """forward(table [B * L * H, 2d] (qk | v rows), key_scale [B * L * H] fp32, sort_idx [BH, N], seq_len,
    heads, chunk, causal) -> [B * L * H, d] in the table's dtype: the LSH core of `LSHCore` in Triton."""

    @staticmethod
    def forward(ctx, table, key_scale, sort_idx, seq_len: int, heads: int, chunk: int, causal: bool):
        kernels = _get_kernels()
        bh, n_items = sort_idx.shape
        d = table.shape[1] // 2
        common = _launch_common(table, sort_idx, seq_len, heads, chunk, causal)
        grid = (n_items // common["BLOCK_M"], bh)
        row_max = torch.empty(bh, n_items, device=table.device, dtype=torch.float32)
        row_sum = torch.empty_like(row_max)
        out = torch.zeros(table.shape[0], d, device=table.device, dtype=torch.float32)
        kernels["forward"][grid](table, key_scale, sort_idx, row_max, row_sum, out, PASS=0, **common)
        scale = round_weights(row_max + row_sum.log(), sort_idx, n_items // seq_len).div_(row_sum)  # w / l
        del row_sum
        kernels["forward"][grid](table, key_scale, sort_idx, row_max, scale, out, PASS=1, **common)
        out = out.to(table.dtype)
        ctx.save_for_backward(table, key_scale, sort_idx, row_max, scale, out)
        ctx.shape = (seq_len, heads, chunk, causal)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with record_function("lsh/attend_backward"):  # the stage `harness profile` reports
            return TritonLSHCore._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        table, key_scale, sort_idx, row_max, scale, out = ctx.saved_tensors
        seq_len, heads, chunk, causal = ctx.shape
        grad_out = grad_out.contiguous()
        grad_dot = (grad_out.float() * out.float()).sum(-1)  # dY . Y per position [B * L * H]
        grad_table = torch.zeros(table.shape, device=table.device, dtype=torch.float32)
        common = _launch_common(table, sort_idx, seq_len, heads, chunk, causal)
        grid = (sort_idx.shape[1] // common["BLOCK_M"], sort_idx.shape[0])
        _get_kernels()["backward"][grid](table, key_scale, sort_idx, row_max, scale, grad_out, grad_dot, grad_table, **common)
        return grad_table.to(table.dtype), None, None, None, None, None, None


def hash_buckets(table: torch.Tensor, rotations: torch.Tensor, factors: tuple[int, ...], *, seq_len: int, chunk: int) -> torch.Tensor:
    """Buckets of the qk rows of table [B * L * H, 2d] -> [B * H, n_hashes * L] int64, round offsets included:
    `variants.attention.lsh_hashing.hash_buckets` in one kernel (the rotated values are never stored).

    rotations [H, d, n_hashes, sum(factors) // 2]; one or two factors (bucket = argmax_a + a * argmax_b);
    seq_len a multiple of chunk. Products are rounded to the table's dtype before the argmax, as the
    ops path's matmul output is, so both see the same values up to the summation order.
    """
    heads, head_dim, n_hashes, _ = rotations.shape
    if len(factors) > 2:
        raise ValueError(f"the Triton hash takes one or two bucket factors, got {factors}")
    f0, f1 = (factors[0], factors[1]) if len(factors) == 2 else (factors[0], 1)
    block = _block(chunk)
    bh = table.shape[0] // seq_len
    buckets = torch.empty(bh, n_hashes * seq_len, device=table.device, dtype=torch.long)

    def width(factor: int) -> int:
        return max(16, 1 << (max(1, factor // 2) - 1).bit_length())

    _get_kernels()["hash"][(seq_len // block, bh)](
        table.contiguous(),
        rotations.to(table.dtype).contiguous(),
        buckets,
        seq_len,
        heads,
        n_hashes,
        D=head_dim,
        BLOCK_L=block,
        F0=f0,
        F1=f1,
        P0=width(f0),
        P1=width(f1),
        S=sum(factors) // 2,
        PRECISION=_precision(table.dtype),
    )
    return buckets


def attend(table: torch.Tensor, sort_idx: torch.Tensor, *, seq_len: int, heads: int, chunk: int, causal: bool) -> torch.Tensor:
    """The LSH core on table [B * L * H, 2d] (qk | v rows (b * L + position) * H + h) -> [B * L * H, d].

    sort_idx [B * H, n_hashes * L]: item id r * L + position of each sorted index (the one sort by
    (round-offset bucket, position)); seq_len must be a multiple of chunk. Differentiable in table.
    """
    from variants.attention.full import shared_qk_key_scale

    d = table.shape[1] // 2
    table = table.contiguous()
    key_scale = shared_qk_key_scale(table[:, :d].detach().float()).view(-1).contiguous()
    if sort_idx.shape[1] % chunk or math.prod(sort_idx.shape) == 0:
        raise ValueError(f"{sort_idx.shape[1]} sorted items are not whole chunks of {chunk}")
    return TritonLSHCore.apply(table, key_scale, sort_idx.contiguous(), seq_len, heads, chunk, causal)
