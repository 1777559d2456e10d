"""The Triton kernels of LSH attention (variants/attention/lsh_triton.py) in Triton's interpreter on CPU.

Forward and gradients of `lsh_attention_packed(..., backend="triton")` in float32 and float16
against the float64 ops path (itself checked against a loop reference, gradcheck and HF in
test_lsh) with the same rotations; inputs exact in the low precision and hashed with a margin
(selfcheck's `lsh_inputs`), so rounding cannot move an item to another bucket. bfloat16 `tl.dot`
is wrong in the interpreter: `harness selfcheck --device cuda` checks bfloat16 on a GPU. Shapes are
tiny: the interpreter runs each program instance through numpy. tests/conftest.py switches the
interpreter on (TRITON_INTERPRET=1) before anything imports triton.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from harness.selfcheck.lsh_checks import LshCase, lsh_inputs  # noqa: E402
from variants.attention import lsh_triton  # noqa: E402
from variants.attention.lsh import lsh_attention_packed  # noqa: E402
from variants.attention.lsh_backends import resolve_backend  # noqa: E402
from variants.registry import VariantUnavailable  # noqa: E402

TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-2}  # of max |reference|, forward and gradients


def pack(qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """qk, v [B, H, L, d] -> packed [B, L, H, 2d] (the layout of the `lsh` module's projection)."""
    return torch.cat([qk.transpose(1, 2), v.transpose(1, 2)], dim=-1).contiguous()


def run(packed, rotations, case, backend, dtype):
    packed = packed.to(dtype).detach().requires_grad_()
    out = lsh_attention_packed(
        packed,
        n_hashes=case.n_hashes,
        bucket_size=case.bucket_size,
        causal=case.causal,
        rotations=rotations.to(dtype),
        dup_correction=case.dup_correction,
        backend=backend,
    )
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * probe.to(dtype)).sum().backward()
    return out.detach().double(), packed.grad.double()


def assert_near(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    error = (got - expected).abs().max().item() / expected.abs().max().item()
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"


CASES = [
    # dtype, n_hashes, causal, bucket_size, head_dim, seq_len (in buckets), n_buckets, batch
    (torch.float32, 1, False, 32, 32, 1, 2, 1),  # seq_len == one bucket: the chunk is its own look-back
    (torch.float32, 1, True, 32, 32, 2, 4, 2),  # two buckets
    (torch.float32, 2, True, 32, 16, 2, 4, 1),  # causal with rounds > 1 (windows across rounds)
    (torch.float32, 4, False, 32, 64, 3, 6, 1),  # length not a power of two
    (torch.float32, 8, True, 32, 32, 3, 4, 1),
    (torch.float32, 2, False, 64, 32, 3, 6, 1),
    (torch.float32, 2, True, 128, 128, 1, 2, 1),
    (torch.float16, 2, True, 32, 32, 3, 6, 1),
    (torch.float16, 3, False, 64, 64, 2, 4, 1),
    (torch.float16, 1, True, 128, 32, 1, 2, 1),
]


@pytest.mark.parametrize("dtype, n_hashes, causal, bucket, head_dim, buckets, n_buckets, batch", CASES)
def test_forward_and_gradients_equal_float64_ops_path(dtype, n_hashes, causal, bucket, head_dim, buckets, n_buckets, batch):
    shape = dict(batch=batch, heads=2, seq_len=bucket * buckets, head_dim=head_dim, bucket_size=bucket, n_buckets=n_buckets)
    case = LshCase(n_hashes, causal, **shape)
    qk, v, rotations = lsh_inputs(case, "float16" if dtype == torch.float16 else "float32")
    packed = pack(qk, v)
    expected = run(packed, rotations, case, "ops", torch.float64)
    got = run(packed, rotations, case, "triton", dtype)
    for g, e in zip(got, expected):
        assert_near(g, e, dtype)


def test_self_only_rows_and_repeated_positions():
    """Causal with every position in one bucket: early positions see only themselves (the self
    penalty decides), and with 2 rounds the window of a round's first chunk holds a position twice."""
    case = LshCase(2, True, batch=1, heads=1, seq_len=64, head_dim=16, bucket_size=32, n_buckets=2)
    qk, v, _ = lsh_inputs(case, "float32")
    rotations = torch.zeros(1, 16, 2, 1, dtype=torch.float64)  # every hash ties: bucket 0 (argmax's first)
    packed = pack(qk, v)
    expected = run(packed, rotations, case, "ops", torch.float64)
    for got, e in zip(run(packed, rotations, case, "triton", torch.float32), expected):
        assert_near(got, e, torch.float32)


def test_module_records_triton_and_dup_correction_falls_back():
    import variants

    module = variants.build("lsh", d_model=32, n_heads=1, n_hashes=2, bucket_size=16, backend="triton", seed=0)
    x = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(0))
    module(x).sum().backward()
    assert module.attention_backend == "triton"
    reference = variants.build("lsh", d_model=32, n_heads=1, n_hashes=2, bucket_size=16, backend="ops", seed=0)
    reference.load_state_dict(module.state_dict())
    torch.testing.assert_close(module(x), reference(x), rtol=1e-4, atol=1e-5)
    dup = resolve_backend("triton", torch.device("cpu"), torch.float32, head_dim=32, bucket_size=16, dup_correction=True)
    assert dup == "triton (dup_correction: ops core)"


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(lsh_triton, "_kernels", {"interpreted": False})
    with pytest.raises(VariantUnavailable, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"), torch.float32, head_dim=32, bucket_size=32)
    with pytest.raises(VariantUnavailable, match="power of two"):
        resolve_backend("triton", torch.device("cpu"), torch.float32, head_dim=24, bucket_size=32)
    assert os.environ.get(lsh_triton.INTERPRET_ENV) == "1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("factors", [(2,), (6,), (40,), (4, 8)])
def test_hash_kernel_equals_hash_buckets(dtype, factors):
    """The fused hash (matmul and argmax in one kernel) against the ops path's `hash_buckets`, with ties
    (zero rotations: every value ties, argmax takes the first) and factorised buckets."""
    from variants.attention.lsh_hashing import draw_rotations, hash_buckets

    batch, heads, seq_len, head_dim, n_hashes = 2, 2, 64, 16, 3
    qk = torch.randn(batch, seq_len, heads, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    table = torch.cat([qk, torch.zeros_like(qk)], dim=-1).reshape(-1, 2 * head_dim)
    rotations = draw_rotations(heads, head_dim, n_hashes, sum(factors), seed=2, dtype=dtype)
    for rot in (rotations, torch.zeros_like(rotations)):
        expected = hash_buckets(qk.transpose(1, 2), n_hashes, factors, rot, cpu_kernel=False).view(batch * heads, -1)
        got = lsh_triton.hash_buckets(table, rot, factors, seq_len=seq_len, chunk=32)
        assert torch.equal(got, expected)
