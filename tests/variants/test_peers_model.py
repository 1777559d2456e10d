"""Whole-model peers (variants/peers_model.py): HF's ReformerModelWithLMHead and lucidrains' ReformerLM
configured from our ReformerLMConfig.

Checked: the config mapping (plain dicts, no package needed), logits shapes equal ours, parameter
counts differ from ours by exactly the documented formula, causality, forward + backward, FLOPs
against torch's FlopCounterMode, the per-length settings HF needs, VariantUnavailable for what a
peer cannot do and for a missing package, and harness/workloads.py building the cell's model variant.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import variants
from harness.store.schema import MODEL_VARIANT as MODEL_VARIANT_KEY
from harness.workloads import build_model_variant, build_workload, step_flops, workload_model_config
from variants.peers_model import HF_MODULE, REFORMER_PYTORCH_MODULE, hf_config_kwargs, reformer_pytorch_kwargs

VOCAB, D, HEADS, D_FF, LAYERS, L = 256, 64, 4, 256, 2, 128
PEERS = {"hf_reformer_lm": HF_MODULE, "reformer_pytorch_lm": REFORMER_PYTORCH_MODULE}
LSH = {"lsh": {"n_hashes": 2, "bucket_size": 32}}
# Two chunks of 64 that see each other: every query sees every key, so causal LSH is strictly causal.
WHOLE_WINDOW = {
    "hf_reformer_lm": {"n_hashes": 1, "bucket_size": 64, "n_buckets": 2, "seed": 0},
    "reformer_pytorch_lm": {"n_hashes": 1, "bucket_size": 64, "seed": 0},
}


def settings(**overrides) -> dict:
    params = dict(
        vocab_size=VOCAB,
        d_model=D,
        n_heads=HEADS,
        d_ff=D_FF,
        n_layers=LAYERS,
        max_seq_len=L,
        attention="lsh",
        attention_params=LSH,
        residual="reversible",
        ffn_chunks=4,
        causal=True,
    )
    return params | overrides


def build(name: str, **overrides) -> torch.nn.Module:
    if name in PEERS:
        pytest.importorskip(PEERS[name])
    torch.manual_seed(0)
    return variants.build(name, **settings(**overrides))


def tokens(batch: int = 2, seq_len: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- mapping (no package needed)


def test_hf_mapping_of_our_fields():
    config = variants.make_config("hf_reformer_lm", **settings(attention=("lsh", "full"), ffn_chunks=4, activation="relu"))
    kwargs = hf_config_kwargs(config)
    expected = dict(
        vocab_size=VOCAB,
        hidden_size=D,
        num_attention_heads=HEADS,
        attention_head_size=D // HEADS,
        feed_forward_size=D_FF,
        hidden_act="relu",
        attn_layers=["lsh", "local"],
        num_hashes=2,
        lsh_attn_chunk_length=32,
        num_buckets=None,
        hash_seed=None,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        local_attn_chunk_length=L,
        local_num_chunks_before=0,
        local_num_chunks_after=0,
        chunk_size_feed_forward=L // 4,
        is_decoder=True,
        max_position_embeddings=L,
        axial_pos_embds=False,
        hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    assert {k: kwargs[k] for k in expected} == expected
    axial = hf_config_kwargs(variants.make_config("hf_reformer_lm", **settings(axial_shape=(8, 16), ffn_chunks=1)))
    assert (axial["axial_pos_embds"], axial["axial_pos_shape"], axial["axial_pos_embds_dim"]) == (True, [8, 16], [32, 32])
    assert axial["chunk_size_feed_forward"] == 0


def test_reformer_pytorch_mapping_of_our_fields():
    kwargs = reformer_pytorch_kwargs(variants.make_config("reformer_pytorch_lm", **settings(residual="standard", ffn_chunks=4)))
    expected = dict(
        num_tokens=VOCAB,
        dim=D,
        depth=LAYERS,
        max_seq_len=L,
        heads=HEADS,
        dim_head=D // HEADS,
        ff_mult=D_FF // D,
        ff_chunks=4,
        causal=True,
        bucket_size=32,
        n_hashes=2,
        full_attn_thres=32,
        absolute_position_emb=True,
        reverse_thres=L,
        lsh_dropout=0.0,
        ff_dropout=0.0,
        weight_tie=False,
        weight_tie_embedding=False,
    )
    assert {k: kwargs[k] for k in expected} == expected
    assert "use_full_attn" not in kwargs
    full = reformer_pytorch_kwargs(variants.make_config("reformer_pytorch_lm", **settings(attention="full", axial_shape=(8, 16))))
    assert full["use_full_attn"] and full["axial_position_emb"] and full["axial_position_shape"] == (8, 16)
    assert full["reverse_thres"] == 0


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("hf_reformer_lm", dict(residual="standard"), "always reversible"),
        ("hf_reformer_lm", dict(attention="full", attention_params={"full": {"shared_qk": True}}), "shared_qk"),
        ("hf_reformer_lm", dict(axial_shape=(2, 4, 16)), "exactly 2 axes"),
        ("hf_reformer_lm", dict(attention_params={"lsh": {"dup_correction": True}}), "dup_correction"),
        ("reformer_pytorch_lm", dict(attention=("lsh", "full")), "model-wide"),
        ("reformer_pytorch_lm", dict(attention_params={"lsh": {"n_buckets": 4}}), "n_buckets"),
        ("reformer_pytorch_lm", dict(d_ff=96), "ff_mult"),
        ("reformer_pytorch_lm", dict(attention_params={"lsh": {"dup_correction": True}}), "dup_correction"),
    ],
)
def test_what_a_peer_cannot_do_is_unavailable(name, overrides, match):
    """Raised before the package is imported, so these hold with or without it."""
    with pytest.raises(variants.VariantUnavailable, match=match):
        variants.build(name, **settings(**overrides))


@pytest.mark.parametrize("name", sorted(PEERS))
def test_missing_package_is_unavailable_with_the_install_hint(name, monkeypatch):
    monkeypatch.setitem(sys.modules, PEERS[name], None)  # the import fails as if the package were missing
    with pytest.raises(variants.VariantUnavailable, match=r"pip install -e \.\[peers\]"):
        variants.build(name, **settings())


def test_length_rules():
    hf = variants.make_config("hf_reformer_lm", **settings())
    hf.check_seq_len(32)  # one chunk: HF attends in full
    hf.check_seq_len(96)
    with pytest.raises(ValueError, match="bucket_size"):
        hf.check_seq_len(80)
    with pytest.raises(ValueError, match="ffn_chunks"):
        variants.make_config("hf_reformer_lm", **settings(ffn_chunks=5)).check_seq_len(96)
    lucidrains = variants.make_config("reformer_pytorch_lm", **settings())
    lucidrains.check_seq_len(128)
    with pytest.raises(ValueError, match="2 \\* bucket_size"):
        lucidrains.check_seq_len(96)


# --------------------------------------------------------------------------- built peers


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", sorted(PEERS))
def test_logits_shape_is_ours(name, causal):
    x = tokens()
    ours = build("reformer_lm", causal=causal).eval()
    peer = build(name, causal=causal).eval()
    with torch.no_grad():
        assert peer(x).shape == ours(x).shape == (2, L, VOCAB)
        assert peer(x[:, :64]).shape == (2, 64, VOCAB)


def hf_formula(peer) -> int:
    """2 d (final LayerNorm over 2 d) + d V (LM head from 2 d) + V (separate, unused lm_head.bias)."""
    separate_bias = peer.model.lm_head.bias is not peer.model.lm_head.decoder.bias
    return 2 * D + D * VOCAB + (VOCAB if separate_bias else 0)


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(attention=("lsh", "full")), dict(axial_shape=(8, 16)), dict(causal=False, n_layers=3)],
    ids=["lsh", "lsh+full", "axial", "bidirectional-3-layers"],
)
def test_hf_parameter_count_differs_from_ours_by_the_formula(overrides):
    ours, peer = build("reformer_lm", **overrides), build("hf_reformer_lm", **overrides)
    assert n_params(peer) - n_params(ours) == hf_formula(peer) == peer.extra_parameters()


@pytest.mark.parametrize(
    "overrides, full_layers",
    [({}, 0), (dict(attention="full"), LAYERS), (dict(attention="full", attention_params={"full": {"shared_qk": True}}), 0)],
    ids=["lsh", "full", "full-shared-qk"],
)
@pytest.mark.parametrize("axial_shape", [None, (8, 16)])
def test_reformer_pytorch_parameter_count_differs_from_ours_by_the_formula(overrides, full_layers, axial_shape):
    """n_layers * d (to_out's bias) - d^2 per full layer whose Q and K are separate in ours."""
    ours = build("reformer_lm", axial_shape=axial_shape, **overrides)
    peer = build("reformer_pytorch_lm", axial_shape=axial_shape, **overrides)
    formula = LAYERS * D - full_layers * D * D
    assert n_params(peer) - n_params(ours) == formula == peer.extra_parameters()


@pytest.mark.parametrize("attention", ["lsh", "full"])
@pytest.mark.parametrize("name", sorted(PEERS))
def test_later_tokens_never_change_earlier_logits(name, attention):
    pattern = ("lsh", "full") if attention == "full" and name == "hf_reformer_lm" else attention
    model = build(name, attention=pattern, attention_params={"lsh": WHOLE_WINDOW[name]}).double().eval()
    x = tokens()
    with torch.no_grad():
        logits = model(x)
        for t in (0, 40, L - 2):
            changed = x.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(L - t - 1)) % VOCAB
            logits_changed = model(changed)
            torch.testing.assert_close(logits_changed[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-12)
            assert not torch.allclose(logits_changed[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize(
    "name, residual",
    [("hf_reformer_lm", "reversible"), ("reformer_pytorch_lm", "reversible"), ("reformer_pytorch_lm", "standard")],
)  # HF with `standard`: unavailable (above)
def test_forward_backward(name, residual):
    model = build(name, residual=residual).train()
    loss = model.loss_bpd(tokens())
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    unused = {"model.lm_head.bias"} if name == "hf_reformer_lm" else set()  # HF's separate, unused bias
    missing = {n for n, p in model.named_parameters() if p.grad is None}
    assert missing == unused & {n for n, _ in model.named_parameters()}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("attention", ["lsh", "full"])
@pytest.mark.parametrize("name", sorted(PEERS))
def test_flops_match_flop_counter(name, attention):
    model = build(name, attention=attention).eval()
    for seq_len in (32, 64, L):  # 32 = bucket_size: full attention instead of hashing
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(tokens(2, seq_len))
        assert model.flops(2, seq_len) == counter.get_total_flops() > 0, seq_len
        assert model.flops(2, seq_len) == 2 * model.flops(1, seq_len)


def test_hf_flops_at_long_lengths_are_its_attention_layers_plus_ffn_and_head():
    """At 16K HF factorises its buckets ([16, 32] for chunk 64): the per-layer terms are hf_lsh's."""
    pytest.importorskip(HF_MODULE)
    params = {"n_hashes": 8, "bucket_size": 64}
    model = variants.build("hf_reformer_lm", **settings(max_seq_len=16384, attention_params={"lsh": params}, ffn_chunks=16))
    layer = variants.build("hf_lsh", d_model=D, n_heads=HEADS, causal=True, **params)
    n = 16384
    assert model.num_buckets(n) == [16, 32] == layer.num_buckets(n)
    expected = LAYERS * (layer.flops(1, n) + 4 * n * D * D_FF) + 2 * n * 2 * D * VOCAB
    assert model.flops(1, n) == expected
    assert model.no_backward_flops(1, n) == LAYERS * layer.no_backward_flops(1, n)


def test_hf_settings_follow_the_sequence_length():
    """Bucket count, FFN chunk size and the local chunk are set for each length (HF fixes them once)."""
    model = build("hf_reformer_lm", attention=("lsh", "full")).eval()
    lsh_layer = model._lsh[0]
    with torch.no_grad():
        for seq_len, buckets in ((64, 4), (128, 8)):  # 2 * seq_len // bucket_size
            model(tokens(1, seq_len))
            assert lsh_layer.num_buckets == buckets
            assert all(f.chunk_size_feed_forward == seq_len // 4 for f in model._ffn)
            assert all(m.chunk_length == seq_len for m in model._local)


def test_reformer_pytorch_seed_fixes_the_rotations():
    model = build("reformer_pytorch_lm", attention_params={"lsh": {"n_hashes": 2, "bucket_size": 16, "seed": 3}}).eval()
    x = tokens()
    with torch.no_grad():
        state = torch.get_rng_state()
        first, second = model(x), model(x)
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    torch.testing.assert_close(first, second, rtol=0, atol=0)


# --------------------------------------------------------------------------- harness/workloads.py


def cell(model_variant: str | None, workload: str = "model", **model) -> types.SimpleNamespace:
    block = settings(**model)
    block.pop("attention"), block.pop("attention_params")
    if model_variant is not None:
        block[MODEL_VARIANT_KEY] = model_variant
    return types.SimpleNamespace(
        workload=workload, mode="train_step", dtype="float32", batch=1, seq_len=L, model=block, variant="lsh", variant_params=LSH["lsh"]
    )


@pytest.mark.parametrize("name", [None, "reformer_lm", *sorted(PEERS)])
def test_workload_builds_the_cells_model_variant_and_steps(name):
    if name in PEERS:
        pytest.importorskip(PEERS[name])
    workload = build_workload(cell(name), torch.device("cpu"))
    assert type(workload.module) is variants.spec(name or "reformer_lm").module_cls
    assert workload.tokens == L and workload.flops == step_flops(workload.module, 1, L, "train_step") > 0
    before = [p.detach().clone() for p in workload.module.parameters()]
    workload.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, workload.module.parameters()))


def test_build_model_variant_takes_any_reformer_lm_config():
    pytest.importorskip(REFORMER_PYTORCH_MODULE)
    config = workload_model_config(cell("reformer_pytorch_lm"))  # our ReformerLMConfig, without the key
    model = build_model_variant("reformer_pytorch_lm", config)
    assert type(model.config) is variants.spec("reformer_pytorch_lm").config_cls and model.config.n_layers == LAYERS
    with pytest.raises(ValueError, match="model variants"):
        build_model_variant("lsh", config)
    with pytest.raises(ValueError, match="workload 'model' only"):
        build_workload(cell("reformer_pytorch_lm", workload="block"), torch.device("cpu"))
