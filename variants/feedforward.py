"""Position-wise feed-forward layer, optionally chunked along the sequence (variant `ffn`).

With `n_chunks > 1` the layer runs chunk by chunk in forward AND backward: forward keeps only its
input (no [B, L, d_ff] intermediate) and backward recomputes each chunk's hidden activations
before differentiating it, so peak intermediate memory is one chunk of d_ff (Reformer §3, trax
`Chunk(..., remat=True)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from variants.registry import register
from variants.residual import autocast_state, capture_rng, restored_rng
from variants.traffic import Traffic, linear, pointwise

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu}


@dataclass
class FeedForwardConfig:
    """d_model: model width; d_ff: hidden width; n_chunks: sequence chunks (1 = unchunked);
    activation: "gelu" or "relu"; dropout: on the hidden activations and on the output."""

    d_model: int = 256
    d_ff: int = 1024
    n_chunks: int = 1
    activation: str = "gelu"
    dropout: float = 0.0

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent."""
        if self.d_model <= 0 or self.d_ff <= 0:
            raise ValueError(f"d_model and d_ff must be positive, got {self.d_model}, {self.d_ff}")
        if self.n_chunks < 1:
            raise ValueError(f"n_chunks must be >= 1, got {self.n_chunks}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _hidden_to_output(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    activation: str,
    dropout: float,
    training: bool,
) -> torch.Tensor:
    """Linear -> activation -> dropout -> Linear on x [..., d_model] -> [..., d_model]."""
    hidden = F.dropout(ACTIVATIONS[activation](F.linear(x, w1, b1)), dropout, training)
    return F.linear(hidden, w2, b2)


class _ChunkedFeedForward(torch.autograd.Function):
    """Chunked FFN whose backward recomputes each chunk; only the input and weights are saved.

    Hidden dropout draws from the global RNG; forward records the RNG state before the first chunk
    and backward replays the chunks in the same order from that state, so masks match.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
        n_chunks: int,
        activation: str,
        dropout: float,
        training: bool,
    ) -> torch.Tensor:
        use_rng = dropout > 0.0 and training
        ctx.rng = capture_rng(x.device) if use_rng else None
        ctx.autocast = autocast_state(x.device)
        chunks = [_hidden_to_output(c, w1, b1, w2, b2, activation, dropout, training) for c in x.tensor_split(n_chunks, dim=1)]
        ctx.save_for_backward(x, w1, b1, w2, b2)
        ctx.settings = (n_chunks, activation, dropout, training)
        return torch.cat(chunks, dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        n_chunks, activation, dropout, training = ctx.settings
        weights = [w.detach().requires_grad_(True) for w in weights]
        grad_weights = [torch.zeros_like(w) for w in weights]
        grad_x_chunks = []
        with restored_rng(ctx.rng), torch.enable_grad(), torch.autocast(**ctx.autocast):
            for x_chunk, g_chunk in zip(x.tensor_split(n_chunks, dim=1), grad_out.tensor_split(n_chunks, dim=1)):
                x_chunk = x_chunk.detach().requires_grad_(True)
                out = _hidden_to_output(x_chunk, *weights, activation, dropout, training)
                grads = torch.autograd.grad(out, [x_chunk, *weights], g_chunk)
                grad_x_chunks.append(grads[0])
                for total, grad in zip(grad_weights, grads[1:]):
                    total += grad
        return (torch.cat(grad_x_chunks, dim=1), *grad_weights, None, None, None, None)


def _split_lengths(length: int, parts: int) -> list[range]:
    """The index ranges `torch.tensor_split` cuts `length` positions into `parts` pieces with."""
    size, extra = divmod(length, parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


@register("ffn", config=FeedForwardConfig, kind="feedforward")
class FeedForward(nn.Module):
    """Position-wise feed-forward Linear -> act -> Linear, chunked along the sequence when n_chunks > 1."""

    def __init__(self, config: FeedForwardConfig):
        super().__init__()
        self.config = config
        self.fc_in = nn.Linear(config.d_model, config.d_ff)
        self.fc_out = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq_len, d_model] -> [batch, seq_len, d_model]."""
        c = self.config
        args = (self.fc_in.weight, self.fc_in.bias, self.fc_out.weight, self.fc_out.bias)
        if c.n_chunks == 1:
            out = _hidden_to_output(x, *args, c.activation, c.dropout, self.training)
        elif not torch.is_grad_enabled():
            # Without autograd nothing is saved: chunking alone bounds the intermediate.
            out = torch.cat(
                [_hidden_to_output(chunk, *args, c.activation, c.dropout, self.training) for chunk in x.tensor_split(c.n_chunks, dim=1)],
                dim=1,
            )
        else:
            out = _ChunkedFeedForward.apply(x, *args, c.n_chunks, c.activation, c.dropout, self.training)
        return self.dropout(out)

    def flops(self, batch: int, seq_len: int) -> int:
        """Analytic forward FLOPs (2 per multiply-add) of the two projections on [batch, seq_len, d_model]."""
        return 2 * 2 * batch * seq_len * self.config.d_model * self.config.d_ff

    def bytes_moved(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """Analytic bytes per forward and backward (variants/traffic.py), per chunk of the sequence:
        fc_in (with bias) writes the [rows, d_ff] hidden layer, the activation reads it and writes it
        again (saving its input for backward), fc_out (with bias) reads it. Chunked (n_chunks > 1),
        backward first recomputes each chunk's forward, so its bytes count in backward too. Dropout
        (0 in benchmarks) is not counted."""
        c = self.config
        n_chunks = min(c.n_chunks, seq_len)
        traffic = Traffic()
        for rows in (batch * len(part) for part in _split_lengths(seq_len, n_chunks)):
            traffic = traffic + linear(rows, c.d_model, c.d_ff, element_size, bias=True)
            traffic = traffic + pointwise(rows * c.d_ff, element_size, saved=1)
            traffic = traffic + linear(rows, c.d_ff, c.d_model, element_size, bias=True)
        if n_chunks > 1:
            traffic = Traffic(traffic.forward, traffic.backward + traffic.forward)
        return traffic
