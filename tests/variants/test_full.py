"""full_attention and the `full` / `sdpa` variants against naive loops, each other and torch SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import variants
from variants.attention.full import full_attention, shared_qk_key_scale, shared_qk_keys, shared_qk_keys_backward


def naive_attention(q, k, v, causal, shared_qk, mask_self=True, normalize_keys=True):
    """Per-position loops in float64 with python-float softmax: the independent reference."""
    batch, heads, seq_len, head_dim = q.shape
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(batch, heads, seq_len, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            if shared_qk and not normalize_keys:  # trax's dot-product attention over q = k
                keys = [q[b, h, j] / math.sqrt(head_dim) for j in range(seq_len)]
            elif shared_qk:  # k_hat = q / sqrt(mean(q^2) + eps) / sqrt(d) = q / sqrt(|q|^2 + eps * d)
                keys = [q[b, h, j] / math.sqrt(float(q[b, h, j] @ q[b, h, j]) + 1e-6 * head_dim) for j in range(seq_len)]
            else:
                keys = [k[b, h, j] / math.sqrt(head_dim) for j in range(seq_len)]
            for i in range(seq_len):
                logits = []
                for j in range(seq_len):
                    logit = float(q[b, h, i] @ keys[j])
                    if causal and j > i:
                        logit = -1e9
                    if shared_qk and mask_self and j == i:
                        logit = -1e5
                    logits.append(logit)
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                out[b, h, i] = sum(w / total * v[b, h, j] for j, w in enumerate(weights))
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared_qk", [False, True])
def test_full_attention_matches_naive_loops(causal, shared_qk):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 7, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = naive_attention(q, k, v, causal, shared_qk)
    got = full_attention(q, q if shared_qk else k, v, causal=causal, shared_qk=shared_qk)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mask_self, normalize_keys", [(False, True), (True, False), (False, False)])
def test_shared_qk_without_self_mask_or_key_normalisation_matches_naive_loops(mask_self, normalize_keys):
    gen = torch.Generator().manual_seed(2)
    q, v = (torch.randn(2, 2, 7, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = naive_attention(q, q, v, True, True, mask_self=mask_self, normalize_keys=normalize_keys)
    got = full_attention(q, q, v, causal=True, shared_qk=True, mask_self=mask_self, normalize_keys=normalize_keys)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_unmasked_normalised_shared_qk_attends_most_to_itself():
    """Why an LSH-trained model fails under full attention without the self-mask: with unit-length
    keys, q_i . k_j = |q_i| cos(q_i, q_j) is largest at j = i (Cauchy-Schwarz), so a position's
    largest weight is on itself, whatever the other tokens."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 1, 16, 8, generator=gen, dtype=torch.float64) * 3
    v = torch.eye(16, dtype=torch.float64)[None, None]  # output row i = attention weights of position i
    weights = full_attention(q, q, v, shared_qk=True, mask_self=False)[0, 0]
    assert torch.equal(weights.argmax(dim=-1), torch.arange(16))
    masked = full_attention(q, q, v, shared_qk=True)[0, 0]
    assert masked.diagonal().max() < 1e-30  # the self-mask leaves no weight on itself


def test_shared_qk_options_without_shared_qk_are_rejected():
    with pytest.raises(ValueError, match="shared-QK attention only"):
        variants.registry.make_config("full", mask_self=False)
    assert not variants.registry.make_config("full", shared_qk=True, mask_self=False, normalize_keys=False).mask_self


def test_shared_qk_ignores_k_argument_and_first_causal_position_sees_itself():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    out = full_attention(q, k, v, causal=True, shared_qk=True)
    torch.testing.assert_close(out, full_attention(q, q, v, causal=True, shared_qk=True))
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])  # nothing but itself to attend to


def test_shared_qk_keys_backward_matches_autograd():
    generator = torch.Generator().manual_seed(3)
    qk = torch.randn(5, 7, 8, dtype=torch.float64, generator=generator).requires_grad_()
    grad_keys = torch.randn(5, 7, 8, dtype=torch.float64, generator=generator)
    (expected,) = torch.autograd.grad(shared_qk_keys(qk), qk, grad_keys)
    torch.testing.assert_close(shared_qk_keys_backward(qk.detach(), grad_keys), expected, rtol=1e-12, atol=1e-12)
    # With the scale given and written into a strided view of a wider buffer (the LSH core's use).
    wide = torch.zeros(5, 7, 16, dtype=torch.float64)
    got = shared_qk_keys_backward(qk.detach(), grad_keys, shared_qk_key_scale(qk.detach()), out=wide[..., :8])
    assert got.data_ptr() == wide.data_ptr()
    torch.testing.assert_close(wide[..., :8], expected, rtol=1e-12, atol=1e-12)
    assert not wide[..., 8:].any()


def test_shared_qk_keys_backward_stays_finite_in_float16_for_short_and_zero_vectors():
    qk = torch.zeros(3, 64, dtype=torch.float16)
    qk[1] = 1e-3  # key scale ~ 1000 / 8: its cube alone overflows float16
    grad_keys = torch.ones(3, 64, dtype=torch.float16)
    got = shared_qk_keys_backward(qk, grad_keys)
    assert torch.isfinite(got).all()
    # float64 reference through autograd
    qk64 = qk.double().requires_grad_()
    (expected,) = torch.autograd.grad(shared_qk_keys(qk64), qk64, grad_keys.double())
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=0)  # fp16 holds 1e-6 (the eps) only roughly


@pytest.mark.parametrize("causal", [False, True])
def test_full_attention_matches_torch_sdpa_math(causal):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(full_attention(q, k, v, causal=causal), expected, rtol=1e-12, atol=1e-12)


def test_full_attention_fp16_masks_stay_finite():
    gen = torch.Generator().manual_seed(3)
    q, v = (torch.randn(1, 2, 8, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    try:
        out = full_attention(q.half(), q.half(), v.half(), causal=True, shared_qk=True)
    except RuntimeError as error:  # some CPU builds lack fp16 matmul
        pytest.skip(f"no fp16 matmul here: {error}")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), naive_attention(q, q, v, True, True), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared_qk", [False, True])
def test_full_and_sdpa_modules_agree(causal, shared_qk):
    torch.manual_seed(4)
    params = dict(d_model=16, n_heads=2, causal=causal, shared_qk=shared_qk)
    full = variants.build("full", **params).double()
    sdpa = variants.build("sdpa", **params).double()
    sdpa.load_state_dict(full.state_dict())
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    out_full, out_sdpa = full(x), sdpa(x)
    torch.testing.assert_close(out_sdpa, out_full, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out_full)
    (g_full,) = torch.autograd.grad(out_full, x, grad)
    (g_sdpa,) = torch.autograd.grad(out_sdpa, x, grad)
    torch.testing.assert_close(g_sdpa, g_full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shared_qk", [False, True])
def test_full_flops_match_flop_counter(shared_qk):
    module = variants.build("full", d_model=16, n_heads=2, shared_qk=shared_qk, causal=True)
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(3, 10, 16))
    assert module.flops(3, 10) == counter.get_total_flops()


def test_sdpa_flops_halve_only_on_causal_fast_path():
    full = variants.build("sdpa", d_model=16, n_heads=2).core_flops(2, 32)
    assert full == 2 * 2 * 2 * 32 * 32 * 16
    assert variants.build("sdpa", d_model=16, n_heads=2, causal=True).core_flops(2, 32) == full // 2
    assert variants.build("sdpa", d_model=16, n_heads=2, causal=True, shared_qk=True).core_flops(2, 32) == full
