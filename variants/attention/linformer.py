"""Linformer attention (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity",
arXiv 2006.04768): the `linformer_attention` functional core and variant `linformer`.

Keys and values are projected along the sequence to k rows by learned E, F in R^{k x n}
(paper eq. 7):

    head = softmax(Q (E K)^T / sqrt(d)) (F V)        Q [n, d], E K and F V [k, d]

so the logits are [n, k]: linear in the length n. n here is `max_seq_len`, the width of E and F;
a shorter sequence of L tokens uses their first L columns (as lucidrains' `linformer` does), i.e.
it is the max_seq_len case with the missing positions' keys and values zero.

Sharing (paper section 4, "parameter sharing"): E and F are shared by all heads of the layer
("headwise sharing", as lucidrains); `share_kv` also sets F = E ("key-value sharing", one [k,
max_seq_len] parameter). The query/key/value projections stay separate either way, so the layer's
in_proj / out_proj are exactly `full`'s (a state dict of `full` loads, E and F then missing);
lucidrains' share_kv also reuses the key projection for the values, which is not the paper's.

E, F start as N(0, 1/k) entries: the paper's random-projection construction (Theorem 1 and 2:
E = delta R, R_ij ~ N(0, 1/k)). Linformer has no causal form: E K mixes all positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from variants.attention.base import AttentionConfig, AttentionModule
from variants.attention.full import full_attention_bytes
from variants.registry import register
from variants.traffic import Traffic, matmul


def linformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, e: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """softmax(Q (E K)^T / sqrt(d)) (F V) per head.

    q, k, v: [batch, heads, seq_len, head_dim]; e, f: [k, seq_len] (the columns of E and F for these
    positions, shared by all heads) -> [batch, heads, seq_len, head_dim].
    """
    keys = e @ k  # [B, H, k, D]
    values = f @ v  # [B, H, k, D]
    logits = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, L, k]
    return torch.softmax(logits, dim=-1) @ values


@dataclass
class LinformerAttentionConfig(AttentionConfig):
    """AttentionConfig plus the Linformer projections.

    k: projected length (rows of E, F; 256 in the paper); max_seq_len: their width, the longest
    sequence; share_kv: F = E (one parameter). Non-causal only.
    """

    k: int = 256
    max_seq_len: int = 4096
    share_kv: bool = False

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent (causal included: there is no causal form)."""
        super().validate()
        if self.causal:
            raise ValueError(
                "linformer has no causal form; its projections E K and F V mix every position, so each output "
                "would see later tokens: use it with causal: false (an encoder), or use a causal variant"
            )
        if self.k < 1:
            raise ValueError(f"k must be positive, got {self.k}")
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}")

    def check_seq_len(self, seq_len: int) -> None:
        """Any length up to max_seq_len (E and F's first seq_len columns are used)."""
        if seq_len > self.max_seq_len:
            raise ValueError(f"linformer: seq_len={seq_len} exceeds max_seq_len={self.max_seq_len} (the width of E and F)")


@register("linformer", config=LinformerAttentionConfig)
class LinformerAttention(AttentionModule):
    """Linformer: keys and values projected along the sequence to k rows by learned E, F (non-causal)."""

    def __init__(self, config: LinformerAttentionConfig):
        super().__init__(config, n_inputs=3)
        self.E = nn.Parameter(torch.randn(config.k, config.max_seq_len) / math.sqrt(config.k))  # [k, max_seq_len]
        self.F = None if config.share_kv else nn.Parameter(torch.randn(config.k, config.max_seq_len) / math.sqrt(config.k))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [batch, heads, seq_len, head_dim] -> same shape; seq_len <= max_seq_len."""
        seq_len = q.shape[-2]
        self.config.check_seq_len(seq_len)
        e = self.E[:, :seq_len]
        f = e if self.F is None else self.F[:, :seq_len]
        return linformer_attention(q, k, v, e, f)

    def core_flops(self, batch: int, seq_len: int) -> int:
        """E K and F V ([k, L] x [L, d] per head), then Q (E K)^T and P (F V) ([L, d] x [d, k] per head)."""
        return 4 * 2 * batch * self.config.k * seq_len * self.config.d_model

    def core_bytes(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """E K and F V ([k, seq_len] x [seq_len, head_dim] per head; E and F are weights), then
        `full_attention_bytes` of the queries against those k keys."""
        c = self.config
        batches = batch * c.n_heads
        projections = matmul(batches, c.k, seq_len, c.head_dim, element_size).times(2)
        return projections + full_attention_bytes(batches, seq_len, c.head_dim, element_size, keys=c.k)
