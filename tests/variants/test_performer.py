"""Variant `performer` (variants/attention/performer.py): FAVOR+, Choromanski et al. 2021.

References in float64, written from the paper: exact softmax attention (the error of the estimate
must fall as the feature count grows) and, with the stabiliser's eps set to 0, the explicit
O(seq_len^2) form with the unstabilised features phi(x) = exp(w . x - |x|^2 / 2) / sqrt(m),
x = q or k over head_dim^(1/4) (the max subtractions must cancel exactly). The peer is
performer-pytorch (skipped when missing), given our random features.
"""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import variants
from variants.attention.performer import orthogonal_random_features, performer_attention

D_MODEL, HEADS = 16, 2
HEAD_DIM = D_MODEL // HEADS


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def softmax_attention(q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v, later keys excluded when causal."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        seq_len = q.shape[-2]
        logits = logits.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(logits, dim=-1) @ v


def explicit_favor(q, k, v, w, causal):
    """sum_j phi(q_i) . phi(k_j) v_j / sum_j phi(q_i) . phi(k_j), phi unstabilised, no eps."""
    d, m = q.shape[-1], w.shape[0]

    def phi(x):
        x = x / d**0.25
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    kernel = phi(q) @ phi(k).transpose(-1, -2)  # [B, H, L, L]: the estimate of exp(q . k / sqrt(d))
    if causal:
        kernel = kernel.tril()
    return (kernel @ v) / kernel.sum(-1, keepdim=True)


def test_orthogonal_random_features():
    w = orthogonal_random_features(20, 8, torch.Generator().manual_seed(0))
    assert w.shape == (20, 8) and w.dtype == torch.float64
    torch.testing.assert_close(w, orthogonal_random_features(20, 8, torch.Generator().manual_seed(0)))
    for block in (w[:8], w[8:16], w[16:]):  # rows orthogonal within a block of head_dim
        directions = block / block.norm(dim=1, keepdim=True)
        torch.testing.assert_close(directions @ directions.T, torch.eye(len(block), dtype=torch.float64))
    # Norms follow chi_8 (mean ~ 2.74): marginally each row is N(0, I); over many rows E|w|^2 = d.
    many = orthogonal_random_features(4000, 8, torch.Generator().manual_seed(1))
    assert abs(many.pow(2).sum(1).mean().item() - 8) < 0.3
    assert abs(many.mean().item()) < 0.02  # Haar directions (QR signs fixed): no bias


@pytest.mark.parametrize("causal", [False, True])
def test_stabilisers_cancel_exactly(causal):
    """With eps = 0 the max subtractions (and the causal running max) change nothing."""
    q, k, v = (randn(2, 2, 13, 4, seed=s) for s in range(3))
    w = orthogonal_random_features(24, 4, torch.Generator().manual_seed(2))
    got = performer_attention(q, k, v, w, causal=causal, kernel_eps=0.0, chunk_size=5)
    torch.testing.assert_close(got, explicit_favor(q, k, v, w, causal), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_error_against_softmax_falls_with_more_features(causal):
    q, k, v = (randn(1, 2, 32, 8, seed=s, scale=0.5) for s in range(3))
    exact = softmax_attention(q, k, v, causal)
    errors = {}
    for m in (16, 256, 2048):
        per_seed = []
        for seed in range(6):
            w = orthogonal_random_features(m, 8, torch.Generator().manual_seed(100 + seed))
            per_seed.append((performer_attention(q, k, v, w, causal=causal, chunk_size=16) - exact).pow(2).mean().sqrt())
        errors[m] = float(torch.stack(per_seed).mean())
    assert errors[16] > 2 * errors[256] and errors[256] > 2 * errors[2048], errors  # ~ 1 / sqrt(m): 4x, then 2.8x
    assert errors[2048] < 0.01, errors


@pytest.mark.parametrize("causal", [False, True])
def test_large_logits_stay_finite_in_float32(causal):
    """|q . k| / sqrt(d) up to ~100: exp would overflow float32 without the max subtraction."""
    q, k, v = (randn(1, 2, 40, 8, seed=s, scale=6.0) for s in range(3))
    w = orthogonal_random_features(64, 8, torch.Generator().manual_seed(3))
    low = performer_attention(q.float(), k.float(), v.float(), w.float(), causal=causal, chunk_size=16)
    assert torch.isfinite(low).all()
    high = performer_attention(q, k, v, w, causal=causal, chunk_size=16)
    torch.testing.assert_close(low.double(), high, rtol=1e-3, atol=1e-3)


def test_causal_outputs_never_see_later_inputs():
    """The key stabiliser is a running max: a large later key must not move earlier outputs (the
    non-causal max over all positions would, through eps)."""
    layer = variants.build("performer", d_model=D_MODEL, n_heads=HEADS, causal=True, n_features=32, feature_seed=0, chunk_size=4)
    layer = layer.double()
    x = randn(1, 21, D_MODEL, seed=4)
    changed = x.clone()
    changed[:, 9:] = randn(1, 12, D_MODEL, seed=5, scale=10.0)
    torch.testing.assert_close(layer(changed)[:, :9], layer(x)[:, :9], rtol=1e-13, atol=1e-13)


def test_features_seed_redraw_and_state_dict():
    def build(**params):
        return variants.build("performer", d_model=D_MODEL, n_heads=HEADS, n_features=12, **params)

    a, b = build(feature_seed=3), build(feature_seed=3)
    assert a.features.shape == (12, HEAD_DIM) and torch.equal(a.features, b.features)
    assert not torch.equal(a.features, build(feature_seed=4).features)
    full = variants.build("full", d_model=D_MODEL, n_heads=HEADS)
    assert set(a.state_dict()) == set(full.state_dict())  # features: a non-persistent buffer
    a.load_state_dict(full.state_dict())  # strict
    x = torch.randn(1, 8, D_MODEL)
    fixed = a.features.clone()
    a.train()
    a(x)
    assert torch.equal(a.features, fixed)  # redraw off
    redrawn = build(feature_seed=3, redraw=True).train()
    torch.manual_seed(7)
    redrawn(x)
    first = redrawn.features.clone()
    assert not torch.equal(first, fixed)
    redrawn(x)
    assert not torch.equal(redrawn.features, first)  # every training forward
    torch.manual_seed(7)
    redrawn(x)
    assert torch.equal(redrawn.features, first)  # from the global RNG: a restored RNG redraws the same
    redrawn.eval()
    redrawn(x)
    assert torch.equal(redrawn.features, first)  # not in eval mode


@pytest.mark.parametrize("causal", [False, True])
def test_flops_match_flop_counter_and_no_quadratic_memory(causal):
    layer = variants.build("performer", d_model=D_MODEL, n_heads=HEADS, causal=causal, n_features=24, chunk_size=16)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(2, 40, D_MODEL))
    assert layer.flops(2, 40) == counter.get_total_flops()
    seq_len = 512
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        layer(torch.randn(1, seq_len, D_MODEL, requires_grad=True)).sum().backward()
    assert max(sizes) <= HEADS * seq_len * 24 + 24 * HEAD_DIM  # the [seq_len, m] features per head
    assert max(sizes) < HEADS * seq_len * seq_len // 8


# --------------------------------------------------------------------------- peer: performer-pytorch


@pytest.mark.parametrize("causal", [False, True])
def test_matches_performer_pytorch_with_the_same_features(causal, monkeypatch):
    """performer_pytorch.FastAttention(dim_heads, nb_features, causal) with its projection_matrix
    replaced by our features, on the same q, k, v.

    Non-causal: the same algorithm (q, k over d^(1/4); max of w . x per query row and over all keys;
    eps inside the features) with its eps 1e-4 (ours 1e-6: passed as kernel_eps). Causal: it keeps
    the max over all keys (later keys then move earlier outputs through eps) and adds 1e-6 to its
    prefix sums of phi(k); ours uses a running max. Both eps are set to 0 on its side
    (monkeypatched) and ours, where the stabilisers cancel, so the two must agree to rounding.
    Feature redraws (its ProjectionUpdater, every 1000 calls) are not involved: FastAttention alone.
    """
    peer_module = pytest.importorskip("performer_pytorch.performer_pytorch")
    q, k, v = (randn(2, 2, 24, HEAD_DIM, seed=s) for s in range(3))
    w = orthogonal_random_features(32, HEAD_DIM, torch.Generator().manual_seed(5))
    peer = peer_module.FastAttention(dim_heads=HEAD_DIM, nb_features=32, causal=causal).double()
    peer.projection_matrix.copy_(w)
    if causal:
        kernel = peer_module.softmax_kernel
        monkeypatch.setattr(peer_module, "softmax_kernel", lambda *a, **kw: kernel(*a, **kw, eps=0.0))
        prefix = peer.causal_linear_fn
        peer.causal_linear_fn = lambda q, k, v: prefix(q, k, v, eps=0.0)
        ours = performer_attention(q, k, v, w, causal=True, kernel_eps=0.0, chunk_size=8)
    else:
        ours = performer_attention(q, k, v, w, kernel_eps=1e-4)
    torch.testing.assert_close(ours, peer(q, k, v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_autograd_of_the_explicit_form(causal):
    # The features' backward is written by hand (only phi is kept): its gradients must be those of
    # autograd through the explicit float64 form, with eps 0 so the stabilisers cancel.
    w = orthogonal_random_features(24, HEAD_DIM, torch.Generator().manual_seed(3))
    q, k, v = (randn(2, HEADS, 12, HEAD_DIM, seed=s).requires_grad_(True) for s in (10, 11, 12))
    probe = randn(2, HEADS, 12, HEAD_DIM, seed=13)
    ours = torch.autograd.grad((performer_attention(q, k, v, w, causal=causal, kernel_eps=0.0, chunk_size=4) * probe).sum(), (q, k, v))
    reference = torch.autograd.grad((explicit_favor(q, k, v, w, causal) * probe).sum(), (q, k, v))
    for got, want in zip(ours, reference):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_positive_features_backward_against_finite_differences():
    from variants.attention.performer import PositiveFeatures

    z = randn(3, 5, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: PositiveFeatures.apply(t, 0.25, 1e-3), (z,))
    torch.testing.assert_close(PositiveFeatures.apply(z, 0.25, 1e-3), torch.exp(z) * 0.25 + 1e-3, rtol=1e-15, atol=0)
