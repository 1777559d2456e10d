"""Variant `local` (variants/attention/local.py): blocked local attention with look-back.

References are written here from the definition, in float64: a dense [seq_len, seq_len] mask of
which key each query may see (block arithmetic, one position at a time) and a plain masked
softmax; with window >= seq_len the layer must equal `full` with the same weights. The peer is
lucidrains' `local-attention` (skipped when missing).
"""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import variants
from variants.attention.local import local_attention

D_MODEL, HEADS = 16, 2
HEAD_DIM = D_MODEL // HEADS


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def allowed_mask(seq_len, window, look_back, look_forward, causal):
    """[seq_len, seq_len] bool, True where query i may attend to key j: j's block is within
    look_back blocks before and look_forward blocks after i's block, and j <= i when causal."""
    mask = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for i in range(seq_len):
        for j in range(seq_len):
            offset = j // window - i // window
            mask[i, j] = -look_back <= offset <= look_forward and (not causal or j <= i)
    return mask


def reference(q, k, v, mask, shared_qk):
    """Masked softmax attention in float64. Shared-QK: keys q / |q| (with the 1e-6 * d of
    `shared_qk_keys`), no other scale, self logit -1e5 (only used when nothing else is allowed)."""
    if shared_qk:
        keys = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6 * q.shape[-1])
        logits = q @ keys.transpose(-1, -2)
    else:
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~mask, -math.inf)
    if shared_qk:
        logits = logits.masked_fill(torch.eye(q.shape[-2], dtype=torch.bool), -1e5)
    return torch.softmax(logits, dim=-1) @ v


CASES = [  # seq_len, window, look_back, look_forward
    (24, 4, 1, 0),
    (24, 4, 2, 1),
    (21, 4, 1, 1),  # padded: 21 is not a multiple of 4
    (19, 5, 0, 2),
    (16, 3, 3, 0),
]


@pytest.mark.parametrize(
    "seq_len, window, look_back, look_forward, causal",
    [(*case, causal) for case in CASES for causal in (False, True) if not (causal and case[3])],  # causal: no look_forward
)
@pytest.mark.parametrize("shared_qk", [False, True])
def test_local_attention_matches_dense_masked_softmax(seq_len, window, look_back, look_forward, causal, shared_qk):
    q, k, v = (randn(2, 2, seq_len, 6, seed=s) for s in range(3))
    mask = allowed_mask(seq_len, window, look_back, look_forward, causal)
    expected = reference(q, k, v, mask, shared_qk)
    got = local_attention(
        q, q if shared_qk else k, v, window=window, look_back=look_back, look_forward=look_forward, causal=causal, shared_qk=shared_qk
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("window, seq_len", [(16, 16), (32, 13)])
def test_window_covering_the_sequence_equals_full(causal, shared_qk, window, seq_len):
    torch.manual_seed(0)
    params = dict(d_model=D_MODEL, n_heads=HEADS, causal=causal, shared_qk=shared_qk)
    full = variants.build("full", **params).double()
    local = variants.build("local", window=window, **params).double()
    local.load_state_dict(full.state_dict())  # strict: the same parameter layout
    x = randn(2, seq_len, D_MODEL, seed=4).requires_grad_()
    out_full, out_local = full(x), local(x)
    torch.testing.assert_close(out_local, out_full, rtol=1e-12, atol=1e-12)
    grad = randn(*out_full.shape, seed=5)
    (g_full,) = torch.autograd.grad(out_full, x, grad)
    (g_local,) = torch.autograd.grad(out_local, x, grad)
    torch.testing.assert_close(g_local, g_full, rtol=1e-10, atol=1e-10)


def test_look_forward_defaults_and_validation():
    def config(**params):
        return variants.make_config("local", d_model=D_MODEL, n_heads=HEADS, **params)

    assert config(look_back=2).forward_blocks == 2  # non-causal: symmetric
    assert config(look_back=2, causal=True).forward_blocks == 0
    assert config(look_back=2, look_forward=1).forward_blocks == 1
    with pytest.raises(ValueError, match="look_forward"):
        config(causal=True, look_forward=1)
    with pytest.raises(ValueError, match="window"):
        config(window=0)
    config(causal=True, look_forward=0).check_seq_len(1000)  # any length: padded


def test_causal_outputs_never_see_later_inputs():
    layer = variants.build("local", d_model=D_MODEL, n_heads=HEADS, causal=True, window=4, look_back=2).double()
    x = randn(1, 30, D_MODEL, seed=6)
    changed = x.clone()
    changed[:, 17:] = randn(1, 13, D_MODEL, seed=7)
    torch.testing.assert_close(layer(changed)[:, :17], layer(x)[:, :17], rtol=1e-14, atol=1e-14)


def test_no_seq_len_squared_tensor_is_saved_for_backward():
    """Memory O(seq_len * window): no saved tensor as large as the [seq_len, seq_len] logits per head."""
    seq_len, window = 256, 16
    layer = variants.build("local", d_model=D_MODEL, n_heads=HEADS, window=window)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        layer(torch.randn(1, seq_len, D_MODEL, requires_grad=True))
    assert max(sizes) <= HEADS * seq_len * 3 * window  # logits [heads, seq_len, (1 + 1 + 1) * window]
    assert max(sizes) < HEADS * seq_len * seq_len // 4


@pytest.mark.parametrize("causal, shared_qk, seq_len", [(False, False, 40), (True, True, 37)])
def test_flops_match_flop_counter(causal, shared_qk, seq_len):
    layer = variants.build("local", d_model=D_MODEL, n_heads=HEADS, causal=causal, shared_qk=shared_qk, window=8, look_back=2)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(3, seq_len, D_MODEL))
    assert layer.flops(3, seq_len) == counter.get_total_flops()
    span = (2 + 1 + (0 if causal else 2)) * 8
    assert layer.core_flops(3, seq_len) == 4 * 3 * math.ceil(seq_len / 8) * 8 * span * D_MODEL


# --------------------------------------------------------------------------- peer: lucidrains' local-attention


@pytest.mark.parametrize("causal, look_back, look_forward", [(False, 1, 1), (False, 2, 0), (True, 1, 0), (True, 2, 0)])
@pytest.mark.parametrize("shared_qk", [False, True])
def test_matches_lucidrains_local_attention_with_same_weights(causal, look_back, look_forward, shared_qk):
    """lucidrains' LocalAttention(window_size, causal, look_backward, look_forward, shared_qk) on
    our layer's projected heads, then our out_proj, must equal our layer.

    Mapping: window_size = window, look_backward = look_back, look_forward given explicitly (its
    default is 0 causal / 1 non-causal; ours None -> look_back non-causal). No `dim`, so no rotary
    embedding; seq_len a multiple of the window (its autopad would attend to the padded keys
    non-causally; ours masks them). Shared-QK: it l2-normalises the keys and still multiplies the
    logits by `scale` (default head_dim^-0.5), ours has no scale, so scale=1.0 is passed; our keys
    carry 1e-6 * head_dim in the norm (relative ~1e-6 here), hence the looser tolerance. Its self
    logit is -5e4 (ours -1e5) and masked logits -finfo.max (ours -1e9): all weigh exactly 0 except a
    causal first position's only key, itself, which both give weight 1.
    """
    peer_module = pytest.importorskip("local_attention")
    window, seq_len = 4, 24
    layer = variants.build(
        "local",
        d_model=D_MODEL,
        n_heads=HEADS,
        causal=causal,
        shared_qk=shared_qk,
        window=window,
        look_back=look_back,
        look_forward=look_forward,
    ).double()
    x = randn(2, seq_len, D_MODEL, seed=8)
    heads = layer.split_heads(x)
    q, k, v = (heads[0], heads[0], heads[1]) if shared_qk else heads
    peer = peer_module.LocalAttention(
        window_size=window,
        causal=causal,
        look_backward=look_back,
        look_forward=look_forward,
        shared_qk=shared_qk,
        scale=1.0 if shared_qk else None,
    )
    peer_heads = peer(q, k, v)  # [batch, heads, seq_len, head_dim]
    expected = layer.out_proj(peer_heads.transpose(1, 2).reshape(2, seq_len, D_MODEL))
    tolerance = 1e-5 if shared_qk else 1e-12
    torch.testing.assert_close(layer(x), expected, rtol=tolerance, atol=tolerance)
