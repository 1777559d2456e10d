"""Variant `linformer` (variants/attention/linformer.py), Wang et al. 2020.

References in float64 from the paper's eq. 7, head by head: softmax(Q (E K)^T / sqrt(d)) (F V),
with the projected keys and values written as sums over positions; and two properties that need
no formula at all: E = F = a permutation of the positions (k = seq_len) leaves softmax attention
unchanged, so the layer equals `full` with the same weights. The peer is lucidrains' `linformer`
(skipped when missing).
"""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import variants

D_MODEL, HEADS = 16, 2
HEAD_DIM = D_MODEL // HEADS


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def build(**params):
    torch.manual_seed(0)
    return variants.build("linformer", d_model=D_MODEL, n_heads=HEADS, **params).double()


def heads_of(weight, x):
    """[B, L, d_model] through a bias-free [d_model, d_model] weight -> [B, heads, L, head_dim]."""
    batch, seq_len, _ = x.shape
    return (x @ weight.T).view(batch, seq_len, HEADS, HEAD_DIM).transpose(1, 2)


def paper_linformer(layer, x):
    """Eq. 7 per head, with E K and F V as explicit sums over the first seq_len positions, then out_proj."""
    batch, seq_len, _ = x.shape
    wq, wk, wv = layer.in_proj.weight.chunk(3)
    q, k, v = heads_of(wq, x), heads_of(wk, x), heads_of(wv, x)
    e = layer.E
    f = layer.E if layer.F is None else layer.F
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(HEADS):
            keys = sum(e[:, n, None] * k[b, h, n][None, :] for n in range(seq_len))  # [k, head_dim]
            values = sum(f[:, n, None] * v[b, h, n][None, :] for n in range(seq_len))
            logits = q[b, h] @ keys.T / math.sqrt(HEAD_DIM)
            out[b, h] = torch.softmax(logits, dim=-1) @ values
    return layer.out_proj(out.transpose(1, 2).reshape(batch, seq_len, D_MODEL))


@pytest.mark.parametrize("share_kv", [False, True])
@pytest.mark.parametrize("seq_len", [12, 20])  # 12 < max_seq_len: E and F's first 12 columns
def test_matches_papers_formula(share_kv, seq_len):
    layer = build(k=6, max_seq_len=20, share_kv=share_kv)
    x = randn(2, seq_len, D_MODEL, seed=1)
    torch.testing.assert_close(layer(x), paper_linformer(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("share_kv", [False, True])
def test_permutation_projections_equal_full_with_same_weights(share_kv):
    seq_len = 10
    full = variants.build("full", d_model=D_MODEL, n_heads=HEADS).double()
    layer = build(k=seq_len, max_seq_len=seq_len, share_kv=share_kv)
    missing, unexpected = layer.load_state_dict(full.state_dict(), strict=False)
    assert sorted(missing) == (["E"] if share_kv else ["E", "F"]) and not unexpected  # the rest is full's layout
    permutation = torch.eye(seq_len, dtype=torch.float64)[torch.randperm(seq_len, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        layer.E.copy_(permutation)
        if layer.F is not None:
            layer.F.copy_(permutation)
    x = randn(3, seq_len, D_MODEL, seed=3)
    torch.testing.assert_close(layer(x), full(x), rtol=1e-12, atol=1e-12)


def test_causal_rejected_and_lengths_checked():
    with pytest.raises(ValueError, match="linformer has no causal form"):
        variants.build("linformer", causal=True)
    config = variants.make_config("linformer", k=8, max_seq_len=64)
    config.check_seq_len(64)
    config.check_seq_len(1)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        config.check_seq_len(65)
    layer = build(k=4, max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        layer(randn(1, 17, D_MODEL, seed=4))


def test_parameters_and_initialisation():
    layer = variants.build("linformer", d_model=D_MODEL, n_heads=HEADS, k=64, max_seq_len=2048)
    assert layer.E.shape == layer.F.shape == (64, 2048)
    assert abs(layer.E.std().item() - 1 / 8) < 0.01  # N(0, 1 / k), the paper's random projection
    shared = variants.build("linformer", d_model=D_MODEL, n_heads=HEADS, k=64, max_seq_len=2048, share_kv=True)
    assert shared.F is None and {n for n, _ in shared.named_parameters()} == {"in_proj.weight", "out_proj.weight", "E"}


def test_flops_and_memory_linear_in_length():
    layer = variants.build("linformer", d_model=D_MODEL, n_heads=HEADS, k=8, max_seq_len=512)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(2, 100, D_MODEL))
    assert layer.flops(2, 100) == counter.get_total_flops()
    assert layer.core_flops(1, 512) == 2 * layer.core_flops(1, 256)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        layer(torch.randn(1, 512, D_MODEL, requires_grad=True)).sum().backward()
    assert max(sizes) <= 3 * 512 * D_MODEL  # in_proj's output; the logits are [heads, 512, 8]
    assert max(sizes) < HEADS * 512 * 512 // 8


# --------------------------------------------------------------------------- peer: lucidrains' linformer


@pytest.mark.parametrize("share_kv", [False, True])
@pytest.mark.parametrize("seq_len", [24, 32])
def test_matches_lucidrains_linformer_with_same_weights(share_kv, seq_len):
    """linformer.LinformerSelfAttention(dim, seq_len=max_seq_len, k, heads) with our weights:
    to_q / to_k / to_v from in_proj, proj_k = E^T and proj_v = F^T ([max_seq_len, k]: its layout is
    transposed), to_out from out_proj with its bias zeroed; it also uses the first seq_len rows for
    a shorter sequence. Its share_kv shares more than ours: the values *are* the keys (to_k reused,
    proj_k for both), where ours keeps separate value weights and sets only F = E (the paper's
    key-value sharing); so for that case our value weights are set to the key weights.
    """
    peer_module = pytest.importorskip("linformer")
    layer = build(k=8, max_seq_len=32, share_kv=share_kv)
    peer = peer_module.LinformerSelfAttention(D_MODEL, seq_len=32, k=8, heads=HEADS, share_kv=share_kv).double()
    wq, wk, wv = layer.in_proj.weight.detach().chunk(3)
    with torch.no_grad():
        if share_kv:
            layer.in_proj.weight.copy_(torch.cat([wq, wk, wk]))
        peer.to_q.weight.copy_(wq)
        peer.to_k.weight.copy_(wk)
        peer.proj_k.copy_(layer.E.T)
        if not share_kv:
            peer.to_v.weight.copy_(wv)
            peer.proj_v.copy_(layer.F.T)
        peer.to_out.weight.copy_(layer.out_proj.weight)
        peer.to_out.bias.zero_()
    x = randn(2, seq_len, D_MODEL, seed=5)
    torch.testing.assert_close(layer(x), peer(x), rtol=1e-12, atol=1e-12)
