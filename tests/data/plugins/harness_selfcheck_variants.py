"""Test-only attention variants that are wrong off float64, the way a broken device or dtype path is:
`harness selfcheck` must FAIL them against its float64 reference. (Exact in float64, so the
reference itself is right.)

Loaded through REFORMER_HARNESS_PLUGINS=harness_selfcheck_variants with this folder on sys.path;
never registered in normal runs.
"""

from __future__ import annotations

from typing import Any

import torch

from variants.attention.base import AttentionConfig, AttentionModule
from variants.registry import register


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Plain softmax(q k^T / sqrt(d)) v on [batch, heads, seq_len, head_dim]."""
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        seq_len = q.shape[-2]
        later = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(later, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


@register("selfcheck_wrong_output", config=AttentionConfig)
class WrongOutputAttention(AttentionModule):
    """Test-only: softmax attention whose output is 1% too large except in float64."""

    def __init__(self, config: AttentionConfig):
        super().__init__(config, n_inputs=3)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = softmax_attention(q, k, v, self.config.causal)
        return out if out.dtype == torch.float64 else out * 1.01

    def core_flops(self, batch: int, seq_len: int) -> int:
        return 4 * batch * seq_len * seq_len * self.config.d_model


class _DoubledGradient(torch.autograd.Function):
    """Identity forward; the backward doubles the gradient except in float64."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad if grad.dtype == torch.float64 else 2 * grad


@register("selfcheck_wrong_gradient", config=AttentionConfig)
class WrongGradientAttention(AttentionModule):
    """Test-only: softmax attention with a right output and a doubled gradient except in float64."""

    def __init__(self, config: AttentionConfig):
        super().__init__(config, n_inputs=3)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _DoubledGradient.apply(softmax_attention(q, k, v, self.config.causal))

    def core_flops(self, batch: int, seq_len: int) -> int:
        return 4 * batch * seq_len * seq_len * self.config.d_model
