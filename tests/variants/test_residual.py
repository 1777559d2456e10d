"""Residual stacks: the reversible stack's recompute, gradients, RNG replay and memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import variants
from variants.model import PreNorm
from variants.registry import make_config, spec

B, L, D, HEADS = 2, 16, 8, 2
LSH = {"n_hashes": 2, "bucket_size": 4}


def make_layers(
    n_layers: int,
    attention: str = "full",
    dropout: float = 0.0,
    ffn_chunks: int = 1,
    d_model: int = D,
    n_heads: int = HEADS,
    **attention_params,
) -> list[tuple[nn.Module, nn.Module]]:
    """n_layers float64 (PreNorm(attention), PreNorm(ffn)) pairs with fixed initial weights."""
    torch.manual_seed(0)
    layers = []
    for _ in range(n_layers):
        attention_layer = variants.build(attention, d_model=d_model, n_heads=n_heads, causal=True, dropout=dropout, **attention_params)
        ffn = variants.build("ffn", d_model=d_model, d_ff=2 * d_model, n_chunks=ffn_chunks, dropout=dropout)
        layers.append((PreNorm(d_model, attention_layer).double(), PreNorm(d_model, ffn).double()))
    return layers


def make_stack(name: str, layers: list[tuple[nn.Module, nn.Module]], **config) -> nn.Module:
    return spec(name).module_cls(make_config(name, **config), layers)


def two_stream_reference(layers, x: torch.Tensor, average: bool = True) -> torch.Tensor:
    """The reversible stack written out with plain autograd (no recompute)."""
    x1 = x2 = x
    for f, g in layers:
        x1 = x1 + f(x2)
        x2 = x2 + g(x1)
    return (x1 + x2) / 2 if average else x1 + x2


class Recorder(nn.Module):
    """Wraps a module and records (detached copies of) the inputs it is called with."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.inputs: list[torch.Tensor] = []
        self.output_dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        out = self.module(x)
        self.output_dtypes.append(out.dtype)
        return out


def test_registered_as_residual_variants() -> None:
    assert {"standard", "reversible"} <= set(variants.available("residual"))


def test_reversible_recompute_reconstructs_layer_inputs() -> None:
    """Inputs recomputed in backward (x2 = y2 - g(y1), x1 = y1 - f(x2)) equal the forward ones."""
    n_layers = 4
    layers = [(Recorder(f), Recorder(g)) for f, g in make_layers(n_layers)]
    stack = make_stack("reversible", layers)
    torch.manual_seed(1)
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    stack(x).sum().backward()

    # The forward inputs themselves match an independent plain two-stream run.
    x1 = x2 = x.detach()
    for f, g in layers:
        assert torch.equal(f.inputs[0], x2)
        x1 = x1 + f.module(x2)
        assert torch.equal(g.inputs[0], x1)
        x2 = x2 + g.module(x1)
    for f, g in layers:
        assert len(f.inputs) == len(g.inputs) == 2  # one forward call, one recompute
        torch.testing.assert_close(f.inputs[1], f.inputs[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(g.inputs[1], g.inputs[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("dropout, ffn_chunks, average", [(0.0, 1, True), (0.1, 1, True), (0.1, 3, False)])
def test_reversible_gradients_match_plain_autograd(dropout: float, ffn_chunks: int, average: bool) -> None:
    """LSH with seed=None draws fresh rotations and dropout>0 fresh masks from the global RNG on every
    call; the recompute must replay them, so gradients equal a plain two-stream autograd run."""
    layers = make_layers(3, attention="lsh", dropout=dropout, ffn_chunks=ffn_chunks, seed=None, **LSH)
    pairs = [m for pair in layers for m in pair]
    stack = make_stack("reversible", layers, average_streams=average)
    params = list(stack.parameters())
    assert len(params) == sum(len(list(m.parameters())) for m in pairs)
    torch.manual_seed(1)
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(B, L, D, dtype=torch.float64)

    # The layers really are random: two calls without reseeding differ.
    with torch.no_grad():
        assert not torch.allclose(stack(x), stack(x))

    torch.manual_seed(123)
    out = stack(x)
    state_after_forward = torch.get_rng_state()
    (out * weight).sum().backward()
    assert torch.equal(torch.get_rng_state(), state_after_forward), "backward must not consume the RNG"
    grads = [x.grad.clone()] + [p.grad.clone() for p in params]

    x.grad = None
    stack.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    ref = two_stream_reference(layers, x, average)
    (ref * weight).sum().backward()
    ref_grads = [x.grad] + [p.grad for p in params]

    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads):
        assert ref_grad is not None
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_reversible_gradcheck(n_layers: int) -> None:
    d_model = 4
    layers = make_layers(n_layers, attention="lsh", d_model=d_model, n_heads=1, seed=0, **LSH)
    stack = make_stack("reversible", layers)
    params = list(stack.parameters())
    torch.manual_seed(1)
    x = torch.randn(1, 8, d_model, dtype=torch.float64, requires_grad=True)
    # Full Jacobian with respect to the input; gradcheck perturbs tensors in place, so passing the
    # parameters as inputs checks their gradients too (fast mode: random projections of the Jacobian,
    # a full one over ~300 parameters would take most of a minute on two cores).
    assert torch.autograd.gradcheck(stack, (x,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda x, *_: stack(x), (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_reversible_recompute_keeps_forward_autocast() -> None:
    layers = [(Recorder(f.float()), Recorder(g.float())) for f, g in make_layers(2)]
    stack = make_stack("reversible", layers)
    x = torch.randn(B, L, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stack(x)
    out.sum().backward()
    for f, g in layers:
        assert f.output_dtypes == g.output_dtypes == [torch.bfloat16, torch.bfloat16]  # forward, recompute
    assert x.grad.dtype == torch.float32


def test_standard_matches_plain_reference() -> None:
    layers = make_layers(2)
    stack = make_stack("standard", layers)
    torch.manual_seed(1)
    x = torch.randn(B, L, D, dtype=torch.float64)
    ref = x
    for f, g in layers:
        ref = ref + f(ref)
        ref = ref + g(ref)
    torch.testing.assert_close(stack(x), ref, rtol=0, atol=1e-12)


def saved_tensor_sizes(name: str, n_layers: int) -> list[int]:
    """Element counts of the tensors autograd keeps from the forward of an n_layers stack."""
    stack = make_stack(name, make_layers(n_layers))
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):  # parameters exist regardless of activations
            sizes.append(t.numel())
        return t

    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stack(x)
    return sizes


def test_reversible_saved_activations_independent_of_depth() -> None:
    reversible = {n: saved_tensor_sizes("reversible", n) for n in (1, 2, 4)}
    assert reversible[1] == reversible[2] == reversible[4]
    assert sum(reversible[4]) <= 2 * B * L * D  # just the two final streams
    # The probe sees activations when there are some: the standard stack's grow with depth.
    standard = {n: sum(saved_tensor_sizes("standard", n)) for n in (1, 2, 4)}
    assert standard[1] < standard[2] < standard[4]


def test_no_grad_forward_matches_reference() -> None:
    layers = make_layers(2)
    stack = make_stack("reversible", layers)
    x = torch.randn(B, L, D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(stack(x), two_stream_reference(layers, x), rtol=0, atol=1e-12)


def test_optimizer_step_sees_gradients() -> None:
    """Every parameter gets a .grad through the reversible Function, and a step changes the loss."""
    layers = make_layers(3)
    stack = make_stack("reversible", layers)
    optimizer = torch.optim.SGD(stack.parameters(), lr=0.1)
    x = torch.randn(B, L, D, dtype=torch.float64)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = stack(x).pow(2).mean()
        loss.backward()
        assert all(p.grad is not None for p in stack.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


def float32_lsh_layers() -> list[tuple[nn.Module, nn.Module]]:
    """Six float32 LSH-8 layers (d_model 128, bucket 32, rotations from the global RNG): at 2048 tokens
    a recomputation that hashed again would move items to other buckets."""
    layers = make_layers(6, attention="lsh", d_model=128, n_heads=2, n_hashes=8, bucket_size=32, seed=None)
    return [(f.float(), g.float()) for f, g in layers]


def test_reversible_lsh_in_float32_replays_its_buckets() -> None:
    """At 2048 tokens in float32 the rebuilt inputs differ from the forward's by rounding, enough for a
    few LSH items to land in other buckets if the recompute hashed again; each flip changes that
    item's attention and the layer below's rebuilt input by far more than rounding (before the
    buckets were replayed: this stack's first input rebuilt with ~50% error). With the forward's
    buckets replayed (variants/replay.py) the inputs come back to rounding and the gradients equal a
    plain two-stream autograd run's."""
    layers = [(Recorder(f), g) for f, g in float32_lsh_layers()]
    stack = make_stack("reversible", layers)
    torch.manual_seed(1)
    x = (0.03 * torch.randn(1, 2048, 128)).requires_grad_()
    weight = torch.randn(1, 2048, 128)
    torch.manual_seed(5)
    (stack(x) * weight).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in stack.parameters()]
    for f, _ in layers:
        first, replayed = f.inputs
        assert (replayed - first).abs().max() <= 1e-4 * first.abs().max()

    x.grad = None
    stack.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    (two_stream_reference(layers, x) * weight).sum().backward()
    for grad, ref_grad in zip(grads, [x.grad] + [p.grad for p in stack.parameters()]):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-3 * float(ref_grad.abs().max()))


def test_a_second_backward_through_a_retained_graph_gets_the_same_gradients() -> None:
    """Every backward replays the forward's buckets, not only the first (retain_graph=True)."""
    stack = make_stack("reversible", float32_lsh_layers())
    torch.manual_seed(1)
    x = (0.03 * torch.randn(1, 2048, 128)).requires_grad_()
    weight = torch.randn(1, 2048, 128)
    torch.manual_seed(5)
    loss = (stack(x) * weight).sum()
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    assert torch.equal(first, second)
