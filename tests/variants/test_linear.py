"""Variant `linear` and the core `kernel_attention` (variants/attention/linear.py), Katharopoulos et al. 2020.

The reference is the paper's explicit O(seq_len^2) form (eq. 4-6; causal eq. 8-9) written as a
loop over query positions in float64: V'_i = sum_j phi(q_i) . phi(k_j) v_j / (sum_j phi(q_i) .
phi(k_j) + eps), j over all positions or j <= i. Gradients through gradcheck. The peer is
lucidrains' `linear-attention-transformer` (skipped when missing), whose feature maps differ.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import variants
from variants.attention.linear import kernel_attention

D_MODEL, HEADS = 16, 2
HEAD_DIM = D_MODEL // HEADS


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def phi(x):
    """elu(x) + 1, written out: x + 1 for x > 0, exp(x) otherwise."""
    return torch.where(x > 0, x + 1, torch.exp(x))


def paper_linear_attention(fq, fk, v, causal, eps, key_scale=None):
    """Eq. 4-6 / 8-9 with features given, one query position at a time; key_scale multiplies phi(k_j)."""
    if key_scale is not None:
        fk = fk * key_scale[..., None]
    out = torch.zeros_like(v)
    seq_len = v.shape[-2]
    for i in range(seq_len):
        last = i + 1 if causal else seq_len
        weights = (fq[..., i : i + 1, :] * fk[..., :last, :]).sum(-1)  # [B, H, j]
        out[..., i, :] = (weights[..., None] * v[..., :last, :]).sum(-2) / (weights.sum(-1, keepdim=True) + eps)
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len, chunk_size", [(13, 64), (13, 4), (16, 4), (9, 1)])
def test_kernel_attention_matches_the_papers_formula(causal, seq_len, chunk_size):
    q, k, v = (randn(2, 3, seq_len, 5, seed=s) for s in range(3))
    expected = paper_linear_attention(phi(q), phi(k), v, causal, eps=1e-6)
    got = kernel_attention(F.elu(q) + 1, F.elu(k) + 1, v, causal=causal, eps=1e-6, chunk_size=chunk_size)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_key_log_scale_multiplies_keys_by_exp_scale(chunk_size):
    """key_log_scale s (non-decreasing): the keys are phi_k * exp(s) -- here s spans 0..40, so the
    unscaled formula needs exp(40) while the core only ever forms exp(s_j - s_i) <= 1."""
    q, k, v = (randn(1, 2, 11, 4, seed=s) for s in range(3))
    fq, fk = phi(q), phi(k)
    scale = torch.linspace(0, 40, 11, dtype=torch.float64).expand(1, 2, 11).contiguous()
    expected = paper_linear_attention(fq, fk, v, True, eps=0.0, key_scale=scale.exp())
    got = kernel_attention(fq, fk, v, causal=True, eps=0.0, chunk_size=chunk_size, key_log_scale=scale)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_attention_gradcheck(causal):
    q, k, v = (randn(1, 1, 6, 3, seed=s).requires_grad_() for s in range(3))

    def fn(q, k, v):
        return kernel_attention(F.elu(q) + 1, F.elu(k) + 1, v, causal=causal, chunk_size=3)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    log_scale = torch.linspace(0, 3, 6, dtype=torch.float64).expand(1, 1, 6)
    assert torch.autograd.gradcheck(
        lambda q, k, v: kernel_attention(F.elu(q) + 1, F.elu(k) + 1, v, causal=True, chunk_size=3, key_log_scale=log_scale),
        (q, k, v),
        fast_mode=True,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_module_equals_paper_formula_on_its_projections_and_loads_full(causal):
    torch.manual_seed(0)
    full = variants.build("full", d_model=D_MODEL, n_heads=HEADS, causal=causal).double()
    layer = variants.build("linear", d_model=D_MODEL, n_heads=HEADS, causal=causal, chunk_size=4).double()
    layer.load_state_dict(full.state_dict())  # strict: same layout
    x = randn(2, 10, D_MODEL, seed=3)
    q, k, v = (F.linear(x, w).view(2, 10, HEADS, HEAD_DIM).transpose(1, 2) for w in full.in_proj.weight.chunk(3))
    heads = paper_linear_attention(phi(q), phi(k), v, causal, eps=1e-6)
    expected = full.out_proj(heads.transpose(1, 2).reshape(2, 10, D_MODEL))
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_causal_outputs_never_see_later_inputs():
    layer = variants.build("linear", d_model=D_MODEL, n_heads=HEADS, causal=True, chunk_size=4).double()
    x = randn(1, 23, D_MODEL, seed=4)
    changed = x.clone()
    changed[:, 10:] = randn(1, 13, D_MODEL, seed=5) * 3
    torch.testing.assert_close(layer(changed)[:, :10], layer(x)[:, :10], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("causal", [False, True])
def test_memory_linear_in_length_no_dd_per_position(causal):
    """No saved tensor of [seq_len, head_dim, head_dim] (a whole-sequence cumsum of k v^T) or
    [seq_len, seq_len]: at most the [chunk, chunk] scores or a chunk's state, or [seq_len, d_model]."""
    seq_len, chunk = 512, 16
    layer = variants.build("linear", d_model=D_MODEL, n_heads=HEADS, causal=causal, chunk_size=chunk)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        layer(torch.randn(1, seq_len, D_MODEL, requires_grad=True)).sum().backward()
    assert max(sizes) <= 3 * seq_len * D_MODEL  # in_proj's output
    assert max(sizes) < HEADS * seq_len * HEAD_DIM * HEAD_DIM // 4


@pytest.mark.parametrize("causal, seq_len", [(False, 50), (True, 50), (True, 64)])
def test_flops_match_flop_counter(causal, seq_len):
    layer = variants.build("linear", d_model=D_MODEL, n_heads=HEADS, causal=causal, chunk_size=16)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(2, seq_len, D_MODEL))
    assert layer.flops(2, seq_len) == counter.get_total_flops()
    assert abs(layer.core_flops(1, 4096) - 4 * layer.core_flops(1, 1024)) <= 0.01 * layer.core_flops(1, 4096)  # linear in length


def test_validation():
    with pytest.raises(ValueError, match="chunk_size"):
        variants.build("linear", chunk_size=0)
    with pytest.raises(ValueError, match="eps"):
        variants.build("linear", eps=-1.0)


# --------------------------------------------------------------------------- peer: linear-attention-transformer


@pytest.mark.parametrize("causal", [False, True])
def test_matches_linear_attention_transformer_with_its_feature_maps(causal):
    """lucidrains' linear_attention_transformer.SelfAttention with our layer's weights (to_q, to_k,
    to_v from in_proj, to_out from out_proj, its bias zeroed) against our projections, our core and
    our out_proj with *its* feature maps -- its semantics are not elu + 1:

    - non-causal `linear_attn`: phi(q) = softmax over features * head_dim^-0.5, phi(k) = softmax
      over positions, no normaliser (phi(q) . sum_j phi(k_j) = head_dim^-0.5 exactly), so it is
      head_dim^-0.5 times our kernel_attention(softmax_f(q), softmax_L(k), v, eps=0);
    - causal `causal_linear_attn` (blindspot_size 1: inclusive prefix sums): phi(q) = softmax over
      features * head_dim^-0.5, phi(k) = exp(k), normaliser clamped at 1e-3 (never reached here);
      the q scale cancels: our kernel_attention(softmax_f(q), exp(k), v, causal, eps=0).
    """
    peer_module = pytest.importorskip("linear_attention_transformer.linear_attention_transformer")
    torch.manual_seed(1)
    layer = variants.build("linear", d_model=D_MODEL, n_heads=HEADS, causal=causal, chunk_size=4).double()
    peer = peer_module.SelfAttention(D_MODEL, HEADS, causal=causal).double()
    with torch.no_grad():
        for linear, weight in zip((peer.to_q, peer.to_k, peer.to_v), layer.in_proj.weight.chunk(3)):
            linear.weight.copy_(weight)
        peer.to_out.weight.copy_(layer.out_proj.weight)
        peer.to_out.bias.zero_()
    x = randn(2, 12, D_MODEL, seed=6)
    q, k, v = layer.split_heads(x)
    if causal:
        heads = kernel_attention(q.softmax(-1), k.exp(), v, causal=True, eps=0.0, chunk_size=4)
    else:
        heads = kernel_attention(q.softmax(-1), k.softmax(-2), v, eps=0.0) * HEAD_DIM**-0.5
    expected = layer.out_proj(heads.transpose(1, 2).reshape(2, 12, D_MODEL))
    torch.testing.assert_close(peer(x), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(layer(x), expected)  # elu + 1 differs from its maps
