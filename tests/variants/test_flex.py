"""Variant `flex` (variants/attention/flex.py): torch FlexAttention with mask presets.

The reference is a masked softmax in float64 with the layer's own projections and a dense
[seq_len, seq_len] mask built here position by position from each preset's definition. What
this torch supports on CPU is pinned too: eager forward (float64 included), compiled forward in
float32, no backward -- which must surface as VariantUnavailable (a skipped row), not a crash.
"""

import math
import os

import pytest
import torch

import variants
from variants.attention.flex import tile_pairs
from variants.registry import VariantUnavailable

pytest.importorskip("torch.nn.attention.flex_attention")

D_MODEL, HEADS = 16, 2
HEAD_DIM = D_MODEL // HEADS
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense_mask(preset, causal, seq_len, window, block):
    """[seq_len, seq_len] bool from the definitions: may query i attend to key j?"""

    def allowed(i, j):
        if preset == "causal":
            ok = j <= i
        elif preset == "sliding_window":
            ok = abs(i - j) < window
        elif preset == "document":  # same document of `block` consecutive tokens
            ok = i // block == j // block
        else:
            ok = True
        return ok and (not causal or j <= i)

    return torch.tensor([[allowed(i, j) for j in range(seq_len)] for i in range(seq_len)])


def reference(layer, x, mask):
    """softmax(q k^T / sqrt(d) masked) v with the layer's weights, then its out_proj (float64)."""
    batch, seq_len, _ = x.shape
    q, k, v = ((x @ w.T).view(batch, seq_len, HEADS, HEAD_DIM).transpose(1, 2) for w in layer.in_proj.weight.chunk(3))
    logits = (q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)).masked_fill(~mask, -math.inf)
    heads = torch.softmax(logits, dim=-1) @ v
    return layer.out_proj(heads.transpose(1, 2).reshape(batch, seq_len, D_MODEL))


def build(**params):
    torch.manual_seed(0)
    return variants.build("flex", d_model=D_MODEL, n_heads=HEADS, compile=False, **params).double()


PRESETS = [  # mask, causal
    (None, False),
    (None, True),
    ("none", False),
    ("causal", True),
    ("sliding_window", False),
    ("sliding_window", True),
    ("document", False),
    ("document", True),
]


@pytest.mark.parametrize("mask, causal", PRESETS[1:])  # (None, False) is ("none", False)
def test_forward_matches_dense_masked_softmax(mask, causal, seq_len=150):  # two BlockMask tiles, the second partial
    layer = build(mask=mask, causal=causal, window=5, block=7)
    preset = mask or ("causal" if causal else "none")
    x = randn(2, seq_len, D_MODEL, seed=1)
    with torch.no_grad():
        got = layer(x)
        expected = reference(layer, x, dense_mask(preset, causal, seq_len, window=5, block=7))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_default_mask_equals_full_with_same_weights(causal):
    full = variants.build("full", d_model=D_MODEL, n_heads=HEADS, causal=causal).double()
    layer = build(causal=causal)
    layer.load_state_dict(full.state_dict())  # strict: the same layout
    x = randn(2, 33, D_MODEL, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), full(x), rtol=1e-12, atol=1e-12)


def test_cpu_backward_is_unavailable_not_a_crash():
    """Torch 2.13 has no FlexAttention backward on CPU: with gradients the layer raises
    VariantUnavailable naming the reason (were it supported, the gradient must match the reference)."""
    layer = build(mask="sliding_window", window=4)
    x = randn(1, 16, D_MODEL, seed=3, dtype=torch.float64).requires_grad_()
    try:
        out = layer(x)
    except VariantUnavailable as error:
        assert "flex" in str(error) and "requires_grad=True" in str(error) and "backward" in str(error)
        return
    expected = reference(layer, x, dense_mask("sliding_window", False, 16, 4, 0))
    (grad,) = torch.autograd.grad(out.sum(), x)
    (grad_expected,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-10, atol=1e-10)


def test_validation():
    with pytest.raises(ValueError, match="mask must be one of"):
        variants.build("flex", mask="banded")
    with pytest.raises(ValueError, match="mask 'none'"):
        variants.build("flex", mask="none", causal=True)
    with pytest.raises(ValueError, match="mask 'causal'"):
        variants.build("flex", mask="causal", causal=False)
    with pytest.raises(ValueError, match="window and block"):
        variants.build("flex", mask="sliding_window", window=0)


@pytest.mark.parametrize("mask, causal", PRESETS[2:])
@pytest.mark.parametrize("seq_len, window, block", [(300, 50, 70), (512, 130, 128), (260, 1, 3)])
def test_tile_pairs_and_flops_match_the_dense_mask(mask, causal, seq_len, window, block):
    """Which 128 x 128 tiles hold an allowed pair, from intervals, against the dense mask."""
    dense = dense_mask(mask, causal, seq_len, window, block)
    n = math.ceil(seq_len / 128)
    padded = torch.zeros(n * 128, n * 128, dtype=torch.bool)
    padded[:seq_len, :seq_len] = dense
    expected = padded.view(n, 128, n, 128).any(dim=3).any(dim=1)
    assert torch.equal(tile_pairs(mask, causal, window, block, seq_len), expected)
    layer = variants.build("flex", d_model=D_MODEL, n_heads=HEADS, mask=mask, causal=causal, window=window, block=block)
    sizes = torch.tensor([min(128, seq_len - s) for s in range(0, seq_len, 128)])
    assert layer.core_flops(2, seq_len) == 4 * 2 * D_MODEL * int((sizes[:, None] * expected * sizes[None, :]).sum())
    eager = variants.build("flex", d_model=D_MODEL, n_heads=HEADS, mask=mask, causal=causal, window=window, block=block, compile=False)
    assert eager.core_flops(2, seq_len) == 4 * 2 * seq_len * seq_len * D_MODEL


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="compiles a CPU kernel (10-30 s): set RUN_SLOW=1 to run it")
def test_compiled_forward_on_cpu_float32_and_no_float64_kernel():
    """The compiled CPU kernel (first compile ~10-25 s) agrees with the eager path in float32;
    float64 has no compiled CPU kernel: VariantUnavailable."""
    compiled = variants.build("flex", d_model=D_MODEL, n_heads=HEADS, mask="sliding_window", window=40, compile=True)
    eager = variants.build("flex", d_model=D_MODEL, n_heads=HEADS, mask="sliding_window", window=40, compile=False)
    eager.load_state_dict(compiled.state_dict())
    x = randn(2, 200, D_MODEL, seed=4, dtype=torch.float32)
    with torch.no_grad():
        try:
            out = compiled(x)
        except VariantUnavailable as error:  # no C++ compiler for inductor here
            pytest.skip(str(error))
        torch.testing.assert_close(out, eager(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(VariantUnavailable, match="float64"):
            compiled.double()(x.double())


@pytest.mark.parametrize("mask", [None, "sliding_window", "document"])
def test_causal_presets_never_see_later_inputs(mask):
    layer = build(mask=mask, causal=True, window=6, block=10)
    x = randn(1, 32, D_MODEL, seed=5)
    changed = x.clone()
    changed[:, 14:] = randn(1, 18, D_MODEL, seed=6) * 3
    with torch.no_grad():
        torch.testing.assert_close(layer(changed)[:, :14], layer(x)[:, :14], rtol=1e-14, atol=1e-14)
