"""The `ffn` variant: chunked == unchunked (values and gradients), and chunking bounds saved memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import variants

B, L, D, D_FF = 2, 10, 8, 32


def make_ffn(n_chunks: int, activation: str = "gelu", dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return variants.build("ffn", d_model=D, d_ff=D_FF, n_chunks=n_chunks, activation=activation, dropout=dropout).double()


def reference(x: torch.Tensor, w1, b1, w2, b2, activation: str) -> torch.Tensor:
    """Unchunked float64 FFN in plain autograd."""
    act = {"gelu": F.gelu, "relu": F.relu}[activation]
    return act(x @ w1.T + b1) @ w2.T + b2


def leaf_copies(ffn: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(True) for p in (ffn.fc_in.weight, ffn.fc_in.bias, ffn.fc_out.weight, ffn.fc_out.bias)]


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("n_chunks", [1, 2, 3, 4, 7, 16])  # L=10: 3, 4 and 7 do not divide it; 16 > L
def test_chunked_matches_unchunked_reference(n_chunks: int, activation: str) -> None:
    ffn = make_ffn(n_chunks, activation)
    torch.manual_seed(1)
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(B, L, D, dtype=torch.float64)

    out = ffn(x)
    out.backward(grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    weights = leaf_copies(ffn)
    out_ref = reference(x_ref, *weights, activation)
    out_ref.backward(grad_out)

    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    params = (ffn.fc_in.weight, ffn.fc_in.bias, ffn.fc_out.weight, ffn.fc_out.bias)
    for param, ref in zip(params, weights):
        torch.testing.assert_close(param.grad, ref.grad, rtol=0, atol=1e-12)


def test_chunked_dropout_replays_masks_in_backward() -> None:
    """Hidden dropout masks drawn in forward are reproduced by the backward recompute."""
    n_chunks, p = 3, 0.3
    ffn = make_ffn(n_chunks, dropout=p)
    torch.manual_seed(1)
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(B, L, D, dtype=torch.float64)

    torch.manual_seed(2)
    out = ffn(x)
    state_after_forward = torch.get_rng_state()
    out.backward(grad_out)
    # backward must not consume the global RNG
    assert torch.equal(torch.get_rng_state(), state_after_forward)

    # Reference: the same per-chunk draws in the same order, plain autograd.
    x_ref = x.detach().clone().requires_grad_(True)
    w1, b1, w2, b2 = weights = leaf_copies(ffn)
    torch.manual_seed(2)
    chunks = [F.dropout(F.gelu(c @ w1.T + b1), p) @ w2.T + b2 for c in x_ref.tensor_split(n_chunks, dim=1)]
    out_ref = F.dropout(torch.cat(chunks, dim=1), p)
    out_ref.backward(grad_out)

    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    for param, ref in zip((ffn.fc_in.weight, ffn.fc_in.bias, ffn.fc_out.weight, ffn.fc_out.bias), weights):
        torch.testing.assert_close(param.grad, ref.grad, rtol=0, atol=1e-12)


def saved_shapes(ffn: torch.nn.Module, seq_len: int) -> list[torch.Size]:
    """Shapes of every tensor autograd saves during forward AND backward of `ffn`."""
    shapes: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(t.shape)
        return t

    x = torch.randn(B, seq_len, D, dtype=torch.float64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ffn(x).sum().backward()
    return shapes


@pytest.mark.parametrize("n_chunks", [4, 5])
def test_chunked_saves_no_full_width_intermediate(n_chunks: int) -> None:
    seq_len = 16
    full_shapes = saved_shapes(make_ffn(1), seq_len)
    # The probe works: the unchunked layer does save a [B, L, d_ff] hidden activation.
    assert any(math.prod(s) == B * seq_len * D_FF for s in full_shapes)

    shapes = saved_shapes(make_ffn(n_chunks), seq_len)
    chunk_len = math.ceil(seq_len / n_chunks)
    hidden = [s for s in shapes if s[-1] == D_FF and len(s) == 3]
    assert hidden, "the backward recompute should save chunk-sized hidden activations"
    assert all(s[1] <= chunk_len for s in hidden), hidden
    assert max(math.prod(s) for s in shapes) < B * seq_len * D_FF


def test_backward_recompute_keeps_forward_autocast() -> None:
    """Backward runs on autograd's thread, outside the caller's autocast; the recompute restores it."""
    ffn = variants.build("ffn", d_model=D, d_ff=D_FF, n_chunks=2)
    x = torch.randn(B, L, D, requires_grad=True)
    hidden_dtypes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] == D_FF and t.dim() == 3:
            hidden_dtypes.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ffn(x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert hidden_dtypes and all(dtype == torch.bfloat16 for dtype in hidden_dtypes)
    assert x.grad.dtype == torch.float32 and ffn.fc_in.weight.grad.dtype == torch.float32


def test_flops_match_flop_counter() -> None:
    ffn = make_ffn(3)
    x = torch.randn(B, L, D, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        ffn(x)
    assert ffn.flops(B, L) == counter.get_total_flops() == 4 * B * L * D * D_FF


@pytest.mark.parametrize("params", [{"n_chunks": 0}, {"activation": "swish"}, {"dropout": 1.0}, {"d_ff": 0}])
def test_invalid_config_raises(params: dict) -> None:
    with pytest.raises(ValueError):
        variants.build("ffn", **params)
