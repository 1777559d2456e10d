"""Causal attention variants: outputs at positions <= t never depend on inputs after t.

LSH attention is strictly causal only when every window covers the whole sequence: otherwise the
hashes of later positions decide which earlier keys share a query's chunk (the causal mask still
keeps later *values* out; see the last two tests).
"""

import pytest
import torch

import variants
from variants.attention.lsh import lsh_attention

SEQ_LEN, T = 32, 13

# Per-variant parameters for this test; variants not listed here are built with their defaults.
OVERRIDES = {
    "full": [dict(shared_qk=False), dict(shared_qk=True)],
    "sdpa": [dict(shared_qk=False), dict(shared_qk=True)],
    # windows covering the whole sequence: 2 chunks that see each other, or bucket_size = seq_len
    "lsh": [dict(n_hashes=1, bucket_size=SEQ_LEN // 2, n_buckets=2), dict(n_hashes=3, bucket_size=SEQ_LEN)],
    "hf_lsh": [dict(n_hashes=1, bucket_size=SEQ_LEN // 2, n_buckets=2), dict(n_hashes=3, bucket_size=SEQ_LEN)],
    "reformer_pytorch_lsh": [dict(n_hashes=1, bucket_size=SEQ_LEN // 2), dict(n_hashes=3, bucket_size=SEQ_LEN)],
    # windows and chunks shorter than the sequence, so the blocked / chunked paths are exercised
    "local": [dict(window=4, look_back=2), dict(window=5, shared_qk=True)],
    "linear": [dict(chunk_size=8)],
    "performer": [dict(n_features=32, chunk_size=8)],
    "flex": [dict(mask="sliding_window", window=6), dict(mask="document", block=10)],
}


def cases():
    for name in variants.available("attention"):
        for params in OVERRIDES.get(name, [{}]):
            try:  # a variant with no causal form (linformer) rejects causal=True in its config
                variants.make_config(name, **params, d_model=16, n_heads=2, causal=True)
            except ValueError as error:
                yield pytest.param(name, params, id=f"{name}-{params}", marks=pytest.mark.skip(reason=str(error)))
                continue
            yield pytest.param(name, params, id=f"{name}-{params}")


@pytest.mark.parametrize("name, params", list(cases()))
def test_later_inputs_never_change_earlier_outputs(name, params):
    params = dict(params, d_model=16, n_heads=2, causal=True)
    if "seed" in variants.describe(name):
        params["seed"] = 0  # same rotations in both calls
    torch.manual_seed(0)
    try:
        module = variants.build(name, **params).double().eval()
        x = torch.randn(2, SEQ_LEN, 16, dtype=torch.float64)
        changed = x.clone()
        changed[:, T + 1 :] = torch.randn(2, SEQ_LEN - T - 1, 16, dtype=torch.float64) * 3
        out, out_changed = module(x), module(changed)
    except variants.VariantUnavailable as error:  # a peer's package missing, an SDPA backend not on CPU
        pytest.skip(str(error))
    torch.testing.assert_close(out_changed[:, : T + 1], out[:, : T + 1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out_changed[:, T + 1 :], out[:, T + 1 :])  # the change is visible later


def test_lsh_causal_mask_keeps_later_values_out_for_any_buckets():
    gen = torch.Generator().manual_seed(1)
    qk, v = (torch.randn(2, 2, 64, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    changed = v.clone()
    changed[:, :, T + 1 :] = 5.0
    kwargs = dict(n_hashes=3, bucket_size=4, causal=True, seed=0)
    out, out_changed = lsh_attention(qk, v, **kwargs), lsh_attention(qk, changed, **kwargs)
    torch.testing.assert_close(out_changed[:, :, : T + 1], out[:, :, : T + 1], rtol=1e-12, atol=1e-12)


def test_lsh_later_keys_can_change_which_earlier_keys_are_seen():
    """Documents a property of Reformer's causal LSH (trax and HF alike), not a wish: with narrow
    windows, changing later qk re-sorts the buckets and so changes earlier outputs."""
    gen = torch.Generator().manual_seed(2)
    qk, v = (torch.randn(1, 2, 64, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    changed = qk.clone()
    changed[:, :, T + 1 :] = torch.randn(1, 2, 64 - T - 1, 8, generator=gen, dtype=torch.float64)
    kwargs = dict(n_hashes=2, bucket_size=4, causal=True, seed=0)
    out, out_changed = lsh_attention(qk, v, **kwargs), lsh_attention(changed, v, **kwargs)
    assert not torch.allclose(out_changed[:, :, : T + 1], out[:, :, : T + 1])
