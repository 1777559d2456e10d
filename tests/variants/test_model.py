"""ReformerLM: shapes, layer patterns, causality, bits per dim, learning, and the stack references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import variants
from variants.model import ReformerLM, bits_per_dim, build_layer_stack
from variants.registry import make_config, spec

VOCAB, L = 16, 16
# LSH windows that cover the whole sequence (2 chunks that see each other): only then is causal LSH
# strictly causal; with narrower windows later hashes move chunk boundaries (see test_causality.py).
LSH_WHOLE_WINDOW = {"n_hashes": 1, "bucket_size": L // 2, "n_buckets": 2, "seed": 0}


def tiny(**overrides) -> ReformerLM:
    params = dict(vocab_size=VOCAB, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=L, attention="full", residual="reversible")
    params.update(overrides)
    torch.manual_seed(0)
    return variants.build("reformer_lm", **params)


def tokens(batch: int = 2, seq_len: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("axial_shape", [None, (4, 4), (2, 3, 3)])
def test_forward_shapes(axial_shape) -> None:
    model = tiny(axial_shape=axial_shape)
    for seq_len in (L, 5):
        assert model(tokens(3, seq_len)).shape == (3, seq_len, VOCAB)


def test_axial_positions_match_per_axis_lookup() -> None:
    """Position p = i * 4 + j embeds as concat(table_0[i], table_1[j]), widths summing to d_model."""
    model = tiny(axial_shape=(4, 4))
    table_0, table_1 = model.positions.tables
    assert table_0.shape[1] + table_1.shape[1] == 16
    expected = torch.stack([torch.cat([table_0[p // 4], table_1[p % 4]]) for p in range(L)])
    assert torch.equal(model.positions(L), expected)


def test_sequence_longer_than_positions_raises() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        tiny(axial_shape=(2, 4))(tokens(1, 9))


def test_attention_pattern_alternates_layers() -> None:
    model = tiny(n_layers=4, attention=("lsh", "full"), attention_params={"lsh": {"n_hashes": 2, "bucket_size": 4}})
    attention = [f.module for f, _ in model.stack.layers]
    lsh_cls, full_cls = spec("lsh").module_cls, spec("full").module_cls
    assert [type(a) for a in attention] == [lsh_cls, full_cls, lsh_cls, full_cls]
    assert all(a.config.n_hashes == 2 and a.config.bucket_size == 4 for a in attention[::2])
    assert all(a.config.causal for a in attention)
    assert all(isinstance(g.module, spec("ffn").module_cls) for _, g in model.stack.layers)
    assert model(tokens()).shape == (2, L, VOCAB)


@pytest.mark.parametrize("residual", ["standard", "reversible"])
@pytest.mark.parametrize("attention", ["full", "sdpa", "lsh"])
def test_later_tokens_never_change_earlier_logits(attention: str, residual: str) -> None:
    model = tiny(attention=attention, residual=residual, attention_params={"lsh": LSH_WHOLE_WINDOW}, ffn_chunks=3).double().eval()
    x = tokens()
    for t in (0, 6, L - 2):
        changed = x.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(L - t - 1)) % VOCAB
        logits, logits_changed = model(x), model(changed)
        torch.testing.assert_close(logits_changed[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(logits_changed[:, t + 1 :], logits[:, t + 1 :])


def test_bits_per_dim_of_uniform_logits_is_log2_vocab() -> None:
    logits = torch.zeros(2, 5, VOCAB)
    targets = tokens(2, 5)
    assert bits_per_dim(logits, targets).item() == pytest.approx(math.log2(VOCAB), abs=1e-6)


def test_bits_per_dim_matches_reference_with_mask() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, VOCAB, dtype=torch.float64)
    targets = tokens(2, 5)
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    bits = []
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                p = logits[b, t].exp() / logits[b, t].exp().sum()
                bits.append(-math.log2(p[targets[b, t]].item()))
    assert bits_per_dim(logits, targets, mask).item() == pytest.approx(sum(bits) / len(bits), rel=1e-12)


def test_loss_bpd_scores_next_tokens() -> None:
    model = tiny().double()
    x = tokens()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, : L // 2] = False  # score the second half only, as the duplication task does
    logits = model(x)
    log_probs = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, x[:, 1:, None])[..., 0]
    expected_all = -log_probs.mean() / math.log(2)
    expected_half = -log_probs[:, L // 2 - 1 :].mean() / math.log(2)
    torch.testing.assert_close(model.loss_bpd(x), expected_all, rtol=1e-12, atol=0)
    torch.testing.assert_close(model.loss_bpd(x, mask=mask), expected_half, rtol=1e-12, atol=0)
    targets = x.roll(-1, dims=1)
    torch.testing.assert_close(model.loss_bpd(x, targets), bits_per_dim(logits, targets), rtol=1e-12, atol=0)


@pytest.mark.parametrize("residual", ["standard", "reversible"])
def test_tiny_model_overfits_tiny_batch(residual: str) -> None:
    model = tiny(residual=residual, attention=("lsh", "full"), ffn_chunks=2, attention_params={"lsh": {"n_hashes": 2, "bucket_size": 4}})
    x = tokens(4, L)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        optimizer.zero_grad()
        loss = model.loss_bpd(x)
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert first > 3.0  # ~log2(16) = 4 bits at initialisation
    assert loss.item() < 1.0


def test_reversible_forward_equals_two_stream_reference() -> None:
    """Reversible: x1 = x2 = embed; y1 = x1 + f(x2); y2 = x2 + g(y1); logits = head(norm(mean))."""
    model = tiny(n_layers=3).double().eval()
    x = tokens()
    with torch.no_grad():
        h = model.token_embedding(x) + model.positions(L)
        x1 = x2 = h
        for f, g in model.stack.layers:
            x1 = x1 + f.module(F.layer_norm(x2, (16,), f.norm.weight, f.norm.bias))
            x2 = x2 + g.module(F.layer_norm(x1, (16,), g.norm.weight, g.norm.bias))
        expected = model.head(model.norm((x1 + x2) / 2))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)  # the autograd.Function path


def test_standard_with_same_weights_is_single_stream() -> None:
    """Same parameter names, so weights move between residual kinds; standard is x + f(x); x + g(x)."""
    reversible = tiny(n_layers=3).double().eval()
    standard = tiny(n_layers=3, residual="standard").double().eval()
    standard.load_state_dict(reversible.state_dict())
    x = tokens()
    with torch.no_grad():
        h = reversible.token_embedding(x) + reversible.positions(L)
        for f, g in reversible.stack.layers:
            h = h + f(h)
            h = h + g(h)
        expected = reversible.head(reversible.norm(h))
        torch.testing.assert_close(standard(x), expected, rtol=0, atol=1e-12)
        # by design the two residual kinds are different functions of the same weights
        assert not torch.allclose(standard(x), reversible(x))


def test_residual_looked_up_by_name() -> None:
    assert type(tiny(residual="standard").stack) is spec("standard").module_cls
    assert type(tiny(residual="reversible").stack) is spec("reversible").module_cls


@pytest.mark.parametrize("name", ["nope", "full"])
def test_unknown_residual_lists_registered(name: str) -> None:
    with pytest.raises(ValueError) as error:
        tiny(residual=name)
    for registered in variants.available("residual"):
        assert registered in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"attention": "nope"},
        {"attention": ("lsh", "nope")},
        {"attention_params": {"nope": {}}},
        {"attention_params": {"lsh": {"d_model": 8}}},
        {"d_model": 15},
        {"activation": "tanh"},
        {"axial_shape": (4, 0)},
        {"n_layers": 0},
        {"dropout": 1.0},
    ],
)
def test_invalid_config_raises(overrides: dict) -> None:
    with pytest.raises(ValueError):
        tiny(**overrides)


def test_build_layer_stack_and_flops() -> None:
    config = make_config(
        "reformer_lm",
        vocab_size=VOCAB,
        d_model=16,
        n_heads=2,
        d_ff=32,
        n_layers=2,
        attention=("lsh", "full"),
        attention_params={"lsh": {"bucket_size": 4}},
    )
    stack = build_layer_stack(config)
    assert type(stack) is spec("reversible").module_cls
    x = torch.randn(2, L, 16, requires_grad=True)
    assert stack(x).shape == x.shape
    batch, d, d_ff = 2, 16, 32
    full_attention = 2 * batch * L * d * d * 4 + 4 * batch * L * L * d  # projections + QK^T and PV
    lsh, full = (f.module for f, _ in stack.layers)
    assert full.flops(batch, L) == full_attention
    ffn = 4 * batch * L * d * d_ff
    assert stack.flops(batch, L) == lsh.flops(batch, L) + full_attention + 2 * ffn
    model = variants.build("reformer_lm", **vars(config))
    assert model.flops(batch, L) == stack.flops(batch, L) + 2 * batch * L * d * VOCAB


def test_dropout_reversible_trains_and_is_reproducible() -> None:
    """With dropout > 0 the reversible model's gradients are the same as standard autograd through an
    identical two-stream computation, i.e. the RNG replay also works inside the full model."""
    model = tiny(dropout=0.1, attention="lsh", attention_params={"lsh": {"n_hashes": 2, "bucket_size": 4}}).double()
    x = tokens()
    torch.manual_seed(5)
    model.loss_bpd(x).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    torch.manual_seed(5)
    h = model.dropout(model.token_embedding(x) + model.positions(L))
    x1 = x2 = h
    for f, g in model.stack.layers:
        x1 = x1 + f(x2)
        x2 = x2 + g(x1)
    logits = model.head(model.norm((x1 + x2) / 2))
    bits_per_dim(logits[:, :-1], x[:, 1:]).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=0, atol=1e-9, msg=name)
