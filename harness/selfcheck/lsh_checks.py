"""`lsh/...` and `lsh_triton/...`: the LSH core (`variants.attention.lsh.lsh_attention`) on the device
in one dtype against the ops path in float64 on the CPU, with the same rotations and inputs drawn so
that rounding cannot move an item to another bucket."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

import variants
from harness.measurement import DTYPES
from harness.selfcheck.framework import Context, Outcome, Skip
from harness.selfcheck.references import BASE_SEED, TOLERANCES, judge, tensor_errors, widened
from variants.model import PreNorm
from variants.registry import VariantUnavailable

LSH_ROUNDS = (1, 2, 4, 8)
# LSH inputs are redrawn until every hash has this margin (relative to the largest rotated value)
# between its best and second-best bucket, so rounding in the device dtype cannot change a bucket.
HASH_MARGINS = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 1e-2}


@dataclass(frozen=True)
class LshCase:
    """One call of the LSH core: qk, v [batch, heads, seq_len, head_dim], chunks of bucket_size tokens,
    n_buckets per round (rotations [heads, head_dim, n_hashes, n_buckets / 2])."""

    n_hashes: int
    causal: bool
    batch: int = 2
    heads: int = 2
    seq_len: int = 256
    head_dim: int = 16
    bucket_size: int = 16
    n_buckets: int = 8
    save_probs: bool = True
    dup_correction: bool = False
    backend: str = "auto"  # on the device; the float64 CPU reference always takes the ops path


LSH_TRITON_ROUNDS = (1, 4)
LONG_LSH = dict(batch=1, seq_len=4096, head_dim=32, bucket_size=64, n_buckets=64)  # LshCase fields of the long case
MAX_REDRAWS = 500


def weak_hashes(qk: torch.Tensor, rotations: torch.Tensor, margin: float) -> torch.Tensor:
    """[batch, heads, seq_len] True where some round's best bucket (argmax of concat([qk R, -qk R]))
    leads the second best by less than `margin` times the largest rotated value (float64)."""
    rotated = torch.einsum("bhld,hdrk->bhlrk", qk, rotations)
    values = torch.cat([rotated, -rotated], dim=-1)
    best = values.topk(2, dim=-1).values
    return ((best[..., 0] - best[..., 1]) < margin * values.abs().amax(dim=-1)).any(dim=-1)


def lsh_inputs(case: LshCase, dtype_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 qk, v and rotations holding values exact in `dtype_name`; qk rows are redrawn until every
    hash clears HASH_MARGINS[dtype_name], so the device's rounding cannot move an item to another bucket."""
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(BASE_SEED + 7 * case.n_hashes + case.causal)

    def draw(*shape: int) -> torch.Tensor:
        return widened(torch.randn(*shape, generator=generator, dtype=torch.float64), dtype)

    rotations = draw(case.heads, case.head_dim, case.n_hashes, case.n_buckets // 2)
    qk = draw(case.batch, case.heads, case.seq_len, case.head_dim)
    for _ in range(MAX_REDRAWS):
        weak = weak_hashes(qk, rotations, HASH_MARGINS[dtype_name])
        if not weak.any():
            break
        qk[weak] = draw(int(weak.sum()), case.head_dim)
    else:
        raise RuntimeError(f"could not draw LSH inputs with hash margins >= {HASH_MARGINS[dtype_name]}")
    return qk, draw(case.batch, case.heads, case.seq_len, case.head_dim), rotations


def lsh_run(case: LshCase, qk: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Output and qk / v gradients of sum(lsh_attention(qk, v) * probe) on the tensors' device and dtype."""
    from variants.attention.lsh import lsh_attention  # the LSH core itself, not a registered layer

    qk, v = qk.detach().requires_grad_(True), v.detach().requires_grad_(True)
    out = lsh_attention(
        qk,
        v,
        n_hashes=case.n_hashes,
        bucket_size=case.bucket_size,
        causal=case.causal,
        rotations=rotations,
        save_probs=case.save_probs,
        dup_correction=case.dup_correction,
        backend=case.backend,
    )
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(BASE_SEED + 3), dtype=torch.float64)
    (out * probe.to(out.device, out.dtype)).sum().backward()
    return {"output": out.detach(), "qk": qk.grad, "v": v.grad}


def check_lsh(case: LshCase, dtype_name: str, context: Context) -> Outcome:
    """The LSH core with `case.n_hashes` rounds on the device in `dtype_name` against float64 on the CPU,
    same rotations and inputs: output and the qk / v gradients."""
    dtype = DTYPES[dtype_name]
    if case.backend == "triton":
        if context.device.type != "cuda":
            raise Skip("the Triton kernels run on CUDA (on CPU: tests/variants/test_lsh_triton.py, in Triton's interpreter)")
        from variants.attention.lsh_backends import resolve_backend

        try:
            resolve_backend("triton", context.device, dtype, head_dim=case.head_dim, bucket_size=case.bucket_size)
        except VariantUnavailable as error:
            raise Skip(str(error)) from None
    qk, v, rotations = lsh_inputs(case, dtype_name)
    device_run = lsh_run(case, *(t.to(context.device, dtype) for t in (qk, v, rotations)))
    reference = lsh_run(replace(case, backend="ops"), qk, v, rotations)
    outcome = judge(tensor_errors(device_run, reference), TOLERANCES[dtype_name])
    outcome.data["case"] = {k: getattr(case, k) for k in case.__dataclass_fields__}
    return outcome


# The reversible stack's replay of LSH's buckets (variants/replay.py): a stack at a size where hashing
# the recomputation's rebuilt inputs again moved items to other buckets (float32 on the CPU: gradients
# off by up to 5x their largest value before the replay). float32 only: with the streams themselves
# in bfloat16 or float16 the subtraction that rebuilds a layer's input (x1 = y1 - f(x2), |f| >> |x1|)
# loses most of x1's bits whatever the buckets (measured: the first layer's weight gradient 1.3x /
# 0.16x off), which is why mixed precision keeps the streams in float32 (autocast).
@dataclass(frozen=True)
class ReversibleLshShape:
    """The stack of `check_reversible_lsh`: `layers` LSH-8 + feed-forward pairs of width `width`."""

    layers: int = 6
    tokens: int = 2048
    width: int = 128
    heads: int = 2
    n_hashes: int = 8
    bucket_size: int = 32


REVERSIBLE_LSH = ReversibleLshShape()


def check_reversible_lsh(dtype_name: str, context: Context) -> Outcome:
    """A reversible stack of LSH-8 layers on the device in `dtype_name`: its gradients (the backward
    rebuilds every layer's input and recomputes it) against plain autograd through the same two-stream
    equations on the same device and dtype with the same RNG draws, so the same buckets: only the
    recomputation can differ."""
    dtype, shape = DTYPES[dtype_name], REVERSIBLE_LSH
    torch.manual_seed(BASE_SEED)
    layers = []
    for _ in range(shape.layers):
        attention = variants.build(
            "lsh", d_model=shape.width, n_heads=shape.heads, causal=True, n_hashes=shape.n_hashes, bucket_size=shape.bucket_size
        )
        ffn = variants.build("ffn", d_model=shape.width, d_ff=2 * shape.width)
        layers.append((PreNorm(shape.width, attention), PreNorm(shape.width, ffn)))
    stack = variants.spec("reversible").module_cls(variants.make_config("reversible"), layers).to(context.device, dtype)
    generator = torch.Generator().manual_seed(BASE_SEED + 11)
    x = (0.03 * torch.randn(1, shape.tokens, shape.width, generator=generator)).to(context.device, dtype)
    probe = torch.randn(x.shape, generator=generator).to(context.device, dtype)

    def gradients(forward) -> dict[str, torch.Tensor | None]:
        inputs = x.detach().requires_grad_(True)
        stack.zero_grad(set_to_none=True)
        torch.manual_seed(BASE_SEED + 5)  # the same rotations in both runs
        out = forward(inputs)
        (out * probe).sum().backward()
        grads = {"output": out.detach(), "input": inputs.grad}
        return grads | {name: p.grad for name, p in stack.named_parameters()}

    def plain(inputs: torch.Tensor) -> torch.Tensor:
        x1 = x2 = inputs
        for f, g in stack.layers:
            x1 = x1 + f(x2)
            x2 = x2 + g(x1)
        return (x1 + x2) / 2

    reversible = gradients(stack)
    reference = gradients(plain)
    outcome = judge(tensor_errors(reversible, reference), TOLERANCES[dtype_name])
    outcome.data["shape"] = asdict(shape)
    return outcome
