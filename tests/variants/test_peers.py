"""Peer variants (variants/attention/peers.py): HF's and lucidrains' LSH attention, forced SDPA backends.

Each peer is checked for being wired correctly: build through the registry, shapes, backward, FLOPs
against torch's FlopCounterMode, and an equivalence that pins the parameter mapping (whole-sequence
windows equal shared-QK full attention; HF equals our `lsh` with the same weights and seed). HF's
numerics against ours in general are tests/variants/test_lsh.py's job.
"""

import math
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import variants
from harness.cells.benchmark import BenchmarkCell, measure_cell
from harness.suites.benchmark import MeasureSpec
from variants.attention.full import full_attention

D_MODEL, HEADS = 32, 4
HEAD_DIM = D_MODEL // HEADS

HF_MODULE = "transformers.models.reformer.modeling_reformer"
LUCIDRAINS_MODULE = "reformer_pytorch.reformer_pytorch"


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def needs(module):
    pytest.importorskip(module)


def build(name, **params):
    torch.manual_seed(0)
    return variants.build(name, d_model=D_MODEL, n_heads=HEADS, **params)


def heads_of(linear, x):
    """[B, L, d_model] through a bias-free projection -> [B, heads, L, head_dim]."""
    batch, seq_len, _ = x.shape
    return linear(x).view(batch, seq_len, HEADS, HEAD_DIM).transpose(1, 2)


def merge(heads):
    batch, _, seq_len, _ = heads.shape
    return heads.transpose(1, 2).reshape(batch, seq_len, D_MODEL)


# --------------------------------------------------------------------------- every peer

PEERS = {
    "hf_lsh": (HF_MODULE, dict(n_hashes=2, bucket_size=8, seed=1)),
    "reformer_pytorch_lsh": (LUCIDRAINS_MODULE, dict(n_hashes=2, bucket_size=8, seed=1)),
    "sdpa_math": (None, dict(shared_qk=True)),
    "sdpa_flash": (None, {}),
}


def build_or_skip(name, **params):
    module, defaults = PEERS[name]
    if module:
        needs(module)
    layer = build(name, **{**defaults, **params})
    try:
        layer(torch.randn(1, 64, D_MODEL))
    except variants.VariantUnavailable as error:
        pytest.skip(str(error))
    return layer


@pytest.mark.parametrize("name", sorted(PEERS))
@pytest.mark.parametrize("causal", [False, True])
def test_forward_shape_and_backward(name, causal):
    layer = build_or_skip(name, causal=causal)
    x = torch.randn(2, 64, D_MODEL, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("name", sorted(PEERS))
def test_flops_match_flop_counter_and_scale(name):
    layer = build_or_skip(name)
    for seq_len in (8, 64, 128):  # 8 <= bucket_size: the full-attention fallback of the LSH peers
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            layer(torch.randn(2, seq_len, D_MODEL))
        if name == "sdpa_flash":  # the counter has no formula for every flash kernel (CPU); as `sdpa`
            assert layer.flops(2, seq_len) == build("sdpa").flops(2, seq_len)
        else:
            assert layer.flops(2, seq_len) == counter.get_total_flops() > 0, seq_len
        assert layer.flops(2, seq_len) == 2 * layer.flops(1, seq_len)
    assert layer.flops(1, 1024) > 2 * layer.flops(1, 512) > 0


@pytest.mark.parametrize("name", ["hf_lsh", "reformer_pytorch_lsh"])
def test_lsh_peer_flops_grow_with_hash_rounds(name):
    needs(PEERS[name][0])
    one, eight = build(name, n_hashes=1, bucket_size=64), build(name, n_hashes=8, bucket_size=64)
    projections = 3 * 2 * 16384 * D_MODEL * D_MODEL
    assert eight.flops(1, 16384) - projections == 8 * (one.flops(1, 16384) - projections)


# --------------------------------------------------------------------------- hf_lsh


def test_hf_lsh_config_mapping():
    needs(HF_MODULE)
    layer = build("hf_lsh", n_hashes=3, bucket_size=16, n_buckets=6, seed=7, causal=True)
    attn = layer.attn
    assert (attn.chunk_length, attn.num_hashes, attn.num_buckets, attn.hash_seed) == (16, 3, 6, 7)
    assert (attn.num_chunks_before, attn.num_chunks_after, attn.is_decoder, attn.dropout) == (1, 0, True, 0.0)
    assert (attn.num_attention_heads, attn.attention_head_size) == (HEADS, HEAD_DIM)
    assert layer.out_proj.bias is None and attn.query_key.bias is None
    factorised = build("hf_lsh", n_hashes=2, bucket_size=16, n_buckets=(2, 4))
    assert factorised.attn.num_buckets == [2, 4] and factorised.num_buckets(64) == [2, 4]
    with pytest.raises(ValueError, match="even"):
        build("hf_lsh", n_hashes=2, bucket_size=16, n_buckets=(2, 3))


def test_hf_lsh_automatic_buckets_are_hfs_and_factorised_for_long_sequences():
    needs(HF_MODULE)
    layer = build("hf_lsh", n_hashes=2, bucket_size=64)
    assert layer.num_buckets(64) is None  # one chunk: HF's standard self-attention
    assert layer.num_buckets(1024) == 32 and layer.num_buckets(3072) == 64  # power of two <= 2 L / chunk
    assert layer.num_buckets(4096) == 128  # the limit with max_position_embeddings 4096: 2 * chunk
    assert layer.num_buckets(16384) == [16, 32]
    hashing = 2 * 16384 * D_MODEL * 2 * (16 + 32) // 2
    chunks = 4 * 2 * 16384 * 2 * 64 * D_MODEL
    assert layer.flops(1, 16384) == 3 * 2 * 16384 * D_MODEL**2 + hashing + chunks


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len, params", [(16, dict(bucket_size=16)), (32, dict(bucket_size=16, n_buckets=2))])
def test_hf_lsh_whole_sequence_equals_shared_qk_full_attention(causal, seq_len, params):
    """One chunk (standard attention) or two chunks that see each other (LSH path): every query sees
    every key once, so the wrapper must equal shared-QK full attention with its own weights."""
    needs(HF_MODULE)
    layer = build("hf_lsh", n_hashes=1, causal=causal, seed=0, **params).double()
    x = randn(2, seq_len, D_MODEL, seed=1)
    qk, v = heads_of(layer.attn.query_key, x), heads_of(layer.attn.value, x)
    expected = layer.out_proj(merge(full_attention(qk, qk, v, causal=causal, shared_qk=True)))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_hf_lsh_equals_our_lsh_with_same_weights_and_seed(causal):
    needs(HF_MODULE)
    params = dict(n_hashes=2, bucket_size=8, seed=3, causal=causal)
    hf = build("hf_lsh", **params).double()
    ours = build("lsh", **params).double()
    with torch.no_grad():
        ours.in_proj.weight.copy_(torch.cat([hf.attn.query_key.weight, hf.attn.value.weight]))
        ours.out_proj.weight.copy_(hf.out_proj.weight)
    x = randn(2, 64, D_MODEL, seed=4)  # 16 buckets, HF's automatic choice and ours alike
    assert hf.num_buckets(64) == 16
    torch.testing.assert_close(hf(x), ours(x), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- reformer_pytorch_lsh


def lucidrains_reference(layer, x, causal):
    """Shared-QK full attention in lucidrains' semantics with its weights: logits q . k_hat / sqrt(head_dim)
    (k_hat = F.normalize(qk)), causal mask, self logit -5e4 (the only key a row may have), then to_out."""
    attn = layer.attn
    qk, v = heads_of(attn.toqk, x), heads_of(attn.tov, x)
    logits = qk @ torch.nn.functional.normalize(qk, dim=-1).transpose(-1, -2) / math.sqrt(HEAD_DIM)
    position = torch.arange(x.shape[1])
    if causal:
        logits = logits.masked_fill(position[:, None] < position[None, :], -1e9)
    logits = logits.masked_fill(position[:, None] == position[None, :], -5e4)
    return attn.to_out(merge(torch.softmax(logits, dim=-1) @ v))


@pytest.mark.parametrize("causal", [False, True])
def test_reformer_pytorch_lsh_chunk_length_is_bucket_size(causal):
    """bucket_size = seq_len / 2 gives two chunks of seq_len / 2 that see each other: full attention.
    Were its chunks any shorter (e.g. bucket_size / 2), windows would miss keys and this would fail."""
    needs(LUCIDRAINS_MODULE)
    layer = build("reformer_pytorch_lsh", n_hashes=1, bucket_size=16, causal=causal, seed=0).double()
    x = randn(2, 32, D_MODEL, seed=5)
    expected = lucidrains_reference(layer, x, causal)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    narrow = build("reformer_pytorch_lsh", n_hashes=1, bucket_size=8, causal=causal, seed=0).double()
    narrow.load_state_dict(layer.state_dict())
    assert not torch.allclose(narrow(x), expected, rtol=1e-4, atol=1e-4)


def test_reformer_pytorch_lsh_short_sequence_and_seed():
    needs(LUCIDRAINS_MODULE)
    layer = build("reformer_pytorch_lsh", n_hashes=4, bucket_size=16, seed=2).double()
    short = randn(1, 16, D_MODEL, seed=6)  # <= bucket_size: its full shared-QK attention
    torch.testing.assert_close(layer(short), lucidrains_reference(layer, short, False), rtol=1e-10, atol=1e-10)
    x = randn(1, 64, D_MODEL, seed=7)
    state = torch.get_rng_state()
    first = layer(x)
    assert torch.equal(torch.get_rng_state(), state)  # the seeded path leaves the global RNG alone
    assert torch.equal(layer(x), first)
    with pytest.raises(ValueError, match="multiple of 2 \\* bucket_size"):
        layer(randn(1, 48, D_MODEL, seed=8))


# --------------------------------------------------------------------------- SDPA backends


def same_weights(name, reference, **params):
    layer = build(name, **params)
    layer.load_state_dict(reference.state_dict())
    return layer


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared_qk", [False, True])
def test_sdpa_math_equals_full_on_cpu(causal, shared_qk):
    full = build("full", causal=causal, shared_qk=shared_qk).double()
    math_layer = same_weights("sdpa_math", full, causal=causal, shared_qk=shared_qk).double()
    x = randn(2, 48, D_MODEL, seed=9)
    torch.testing.assert_close(math_layer(x), full(x), rtol=1e-10, atol=1e-10)
    assert math_layer.flops(2, 48) == full.flops(2, 48)


@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_efficient"])
def test_fused_backend_on_cpu_matches_full_or_is_unavailable(name):
    """Torch 2.13 has a CPU flash kernel but no CPU memory-efficient one: either way the variant must
    match `full` or say, as VariantUnavailable, which backend is missing."""
    full = build("full").float()
    layer = same_weights(name, full)
    x = randn(2, 64, D_MODEL, seed=10, dtype=torch.float32)
    try:
        out = layer(x)
    except variants.VariantUnavailable as error:
        assert name in str(error) and "no kernel" in str(error)
        return
    torch.testing.assert_close(out, full(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_efficient", "sdpa_math"])
@pytest.mark.parametrize("causal", [False, True])
def test_backends_on_cuda_match_full(name, causal):
    full = build("full", causal=causal).cuda()
    layer = same_weights(name, full, causal=causal).cuda().half()
    x = randn(2, 256, D_MODEL, seed=11, dtype=torch.float32).cuda()
    torch.testing.assert_close(layer(x.half()).float(), full(x), rtol=2e-2, atol=2e-2)
    fp32 = same_weights(name, full, causal=causal).cuda()
    if name == "sdpa_flash":  # flash has no fp32 kernel on CUDA
        with pytest.raises(variants.VariantUnavailable, match="FLASH_ATTENTION"):
            fp32(x)


# --------------------------------------------------------------------------- unavailable -> skipped


@pytest.fixture
def without_peer_packages(monkeypatch):
    """Pretend transformers and reformer_pytorch are not installed (a None entry makes import fail)."""
    for name in ("transformers", "transformers.models.reformer", HF_MODULE, "reformer_pytorch", LUCIDRAINS_MODULE):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("name, package", [("hf_lsh", "'transformers'"), ("reformer_pytorch_lsh", "'reformer-pytorch'")])
def test_missing_package_names_package_and_extra(without_peer_packages, name, package):
    with pytest.raises(variants.VariantUnavailable) as error:
        variants.build(name, d_model=D_MODEL, n_heads=HEADS)
    assert package in str(error.value) and "pip install -e .[peers]" in str(error.value)
    assert "n_hashes" in variants.describe(name)  # still registered, listed and validated


def cell(variant, **params):
    return BenchmarkCell(
        suite="peers_test",
        workload="attention",
        mode="forward_backward",
        device="cpu",
        dtype="float32",
        seq_len=64,
        batch=1,
        tokens_per_batch=None,
        model={"d_model": D_MODEL, "n_heads": HEADS, "causal": False},
        variant=variant,
        variant_params=params,
        label=variant,
        measure=MeasureSpec(warmup=1, min_repeats=1, min_time_s=0.0).model_dump(),
    )


def test_runner_records_missing_package_as_skipped(without_peer_packages):
    row = measure_cell(cell("reformer_pytorch_lsh", n_hashes=2, bucket_size=16), limit_memory=False)
    assert row["status"] == "skipped", row
    assert "reformer-pytorch" in row["message"] and "[peers]" in row["message"]


def test_runner_records_missing_sdpa_kernel_as_skipped_and_runs_the_rest():
    efficient = measure_cell(cell("sdpa_efficient"), limit_memory=False)
    if efficient["status"] == "ok":
        pytest.skip("this torch has a memory-efficient SDPA kernel on CPU")
    assert efficient["status"] == "skipped" and "EFFICIENT_ATTENTION" in efficient["message"], efficient
    assert measure_cell(cell("sdpa_math"), limit_memory=False)["status"] == "ok"
