"""Residual stacks over (f, g) layer pairs: variants `standard` and `reversible` (kind `residual`).

`standard`:   x = x + f(x); x = x + g(x)                          (per layer)
`reversible`: x1 = x2 = x; y1 = x1 + f(x2); y2 = x2 + g(y1)       (per layer, RevNet / Reformer)
              output = (y1 + y2) / 2  (or y1 + y2 with average_streams=False)

The reversible stack runs as one autograd Function that saves only the final two streams and, in
backward, recomputes each layer's inputs from its outputs (x2 = y2 - g(y1), x1 = y1 - f(x2)), so
activation memory does not grow with the number of layers. Randomness inside f and g (LSH
rotations with seed=None, dropout) comes from torch's global RNG: the state is captured before
every f and g call and restored for the recompute, so buckets and dropout masks match; those
snapshots (a few KiB per layer) and each call's replay memo (variants/replay.py: what a layer's
discrete choices were, LSH's buckets, ~1 MiB per LSH layer at 16K tokens and 8 rounds) are the only
per-layer state kept. The autocast state of the forward is replayed in the recompute too. Reconstruction is exact up to rounding (~1e-15 in
float64); in low precision the recomputed inputs drift slightly from the forward ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from variants.registry import register
from variants.replay import CallMemo, recording, replaying
from variants.traffic import Traffic, pointwise, total_traffic

Layers = Sequence[tuple[nn.Module, nn.Module]]


@dataclass
class RngState:
    """torch's global RNG state: the CPU generator and, for CUDA inputs, that device's generator."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None
    cuda_index: int | None = None


def capture_rng(device: torch.device) -> RngState:
    """Snapshot the global RNG that code running on `device` draws from (CPU always, plus CUDA)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return RngState(torch.get_rng_state(), torch.cuda.get_rng_state(index), index)
    return RngState(torch.get_rng_state())


@contextmanager
def restored_rng(state: RngState | None) -> Iterator[None]:
    """Run the body from RNG `state`, then put the global RNG back as it was; None is a no-op."""
    if state is None:
        yield
        return
    devices = [state.cuda_index] if state.cuda_index is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state.cpu)
        if state.cuda is not None:
            torch.cuda.set_rng_state(state.cuda, state.cuda_index)
        yield


def autocast_state(device: torch.device) -> dict[str, Any]:
    """torch.autocast(**kwargs) arguments that reproduce the autocast state now active for `device`.

    Backward runs on autograd's own thread, where the caller's autocast is off; recomputes wrap
    themselves in this so they run in the same precision as the forward they replay.
    """
    kind = device.type
    return {"device_type": kind, "enabled": torch.is_autocast_enabled(kind), "dtype": torch.get_autocast_dtype(kind)}


@dataclass
class ResidualConfig:
    """average_streams: the reversible stack returns the mean of its two streams (True) or their sum
    (False); the standard stack has a single stream and ignores it."""

    average_streams: bool = True


class _ResidualStack(nn.Module):
    """Holds the (f, g) pairs as `layers[i][0]`, `layers[i][1]` so their parameters are registered."""

    def __init__(self, config: ResidualConfig, layers: Layers = ()):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(nn.ModuleList([f, g]) for f, g in layers)

    def flops(self, batch: int, seq_len: int) -> int:
        """Analytic forward FLOPs (2 per multiply-add) of all f and g; additions are not counted."""
        return sum(f.flops(batch, seq_len) + g.flops(batch, seq_len) for f, g in self.layers)

    def layer_bytes(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """Bytes of all f and g and of the residual additions (one pass of two [B, L, d_model]
        inputs into one each), per forward and backward (variants/traffic.py)."""
        parts = [f.bytes_moved(batch, seq_len, element_size) + g.bytes_moved(batch, seq_len, element_size) for f, g in self.layers]
        width = self.layers[0][0].norm.normalized_shape[0] if len(self.layers) else 0
        additions = pointwise(batch * seq_len * width, element_size, inputs=2).times(2 * len(self.layers))
        return total_traffic(parts) + additions


@register("standard", config=ResidualConfig, kind="residual")
class StandardResidual(_ResidualStack):
    """Ordinary pre-norm residual stack: x = x + f(x); x = x + g(x) per layer."""

    def bytes_moved(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """`layer_bytes`: every layer's f, g and residual additions, per forward and backward."""
        return self.layer_bytes(batch, seq_len, element_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq_len, d_model] -> [batch, seq_len, d_model]."""
        for f, g in self.layers:
            x = x + f(x)
            x = x + g(x)
        return x


def _subtract_into(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """y - out, detached; written over out's storage when both have the same dtype and shape.

    A recomputed layer output is still needed as the root of its backward, but only for its graph,
    not its values (no op here saves its own output; autograd would raise if one did, since the
    detached alias shares its version counter), so its memory can hold the reconstructed input: one
    activation less at the backward's peak. Under autocast the output is in low precision while
    the streams are not: then a new tensor, so the input is rebuilt in the streams' precision.
    """
    if out.dtype != y.dtype or out.shape != y.shape:
        return y - out.detach()
    return out.detach().neg_().add_(y)


class _ReversibleStackFunction(torch.autograd.Function):
    """Two-stream reversible stack; saves only the final streams, recomputes inputs in backward.

    `params` are the stack's trainable parameters, passed as inputs so that their gradients are
    returned through autograd (optimisers, torch.autograd.grad and gradcheck all see them).
    """

    @staticmethod
    def forward(
        ctx: Any, x1: torch.Tensor, x2: torch.Tensor, layers: nn.ModuleList, *params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.autocast = autocast_state(x1.device)
        ctx.layers, ctx.params, ctx.replay = layers, params, []
        backward = any(ctx.needs_input_grad)  # else no replay will come: keep nothing
        for f, g in layers:
            rng_f, memo_f = capture_rng(x1.device), CallMemo() if backward else None
            with recording(memo_f):
                y1 = x1 + f(x2)
            rng_g, memo_g = capture_rng(x1.device), CallMemo() if backward else None
            with recording(memo_g):
                y2 = x2 + g(y1)
            x1, x2 = y1, y2
            ctx.replay.append((rng_f, memo_f, rng_g, memo_g))
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y1: torch.Tensor, grad_y2: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y1, y2 = (t.detach() for t in ctx.saved_tensors)
        index = {id(p): i for i, p in enumerate(ctx.params)}
        grad_params: list[torch.Tensor | None] = [None] * len(ctx.params)

        def local_grads(module: nn.Module, out: torch.Tensor, inp: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
            """VJP of `out = module(inp)` with `grad_out`: adds to the parameter grads, returns d/d inp."""
            params = [p for p in module.parameters() if id(p) in index]
            grads = torch.autograd.grad(out, [inp, *params], grad_out, allow_unused=True)
            for p, grad in zip(params, grads[1:]):
                if grad is not None:
                    i = index[id(p)]
                    grad_params[i] = grad if grad_params[i] is None else grad_params[i] + grad
            return grads[0] if grads[0] is not None else torch.zeros_like(inp)

        with torch.autocast(**ctx.autocast):
            for (f, g), (rng_f, memo_f, rng_g, memo_g) in zip(reversed(ctx.layers), reversed(ctx.replay)):
                # Undo y2 = x2 + g(y1); y1 also feeds the next layer, so its gradient accumulates.
                y1.requires_grad_(True)
                with torch.enable_grad(), restored_rng(rng_g), replaying(memo_g):
                    g_out = g(y1)
                x2 = _subtract_into(y2, g_out).requires_grad_(True)
                grad_y1 = grad_y1 + local_grads(g, g_out, y1, grad_y2)
                del g_out
                # Undo y1 = x1 + f(x2).
                with torch.enable_grad(), restored_rng(rng_f), replaying(memo_f):
                    f_out = f(x2)
                x1 = _subtract_into(y1, f_out)
                grad_y2 = grad_y2 + local_grads(f, f_out, x2, grad_y1)
                del f_out
                y1, y2 = x1, x2.detach()
        # grad_y1 / grad_y2 now hold the gradients of the stack's inputs x1 / x2.
        return (grad_y1, grad_y2, None, *grad_params)


@register("reversible", config=ResidualConfig, kind="residual")
class ReversibleResidual(_ResidualStack):
    """Reversible two-stream residual stack (RevNet); activation memory independent of depth."""

    def bytes_moved(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """`layer_bytes` plus, in backward, every f and g recomputed (their forward bytes again) and
        each layer's two inputs rebuilt by a subtraction; the streams' final average is one pass."""
        layers = self.layer_bytes(batch, seq_len, element_size)
        width = self.layers[0][0].norm.normalized_shape[0] if len(self.layers) else 0
        rebuild = pointwise(batch * seq_len * width, element_size, inputs=2).times(2 * len(self.layers))
        average = pointwise(batch * seq_len * width, element_size, inputs=2)
        return layers + average + Traffic(0, layers.forward + rebuild.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq_len, d_model] -> mean (or sum) of the two final streams, same shape."""
        if torch.is_grad_enabled() and len(self.layers):
            params = [p for p in self.layers.parameters() if p.requires_grad]
            y1, y2 = _ReversibleStackFunction.apply(x, x, self.layers, *params)
        else:
            y1 = y2 = x
            for f, g in self.layers:
                y1 = y1 + f(y2)
                y2 = y2 + g(y1)
        return (y1 + y2) / 2 if self.config.average_streams else y1 + y2
