"""What every attention variant shares: the config fields and the input/output projections."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from variants.traffic import Traffic, linear, pointwise


@dataclass
class AttentionConfig:
    """Parameters common to all attention variants.

    d_model: model width; n_heads: heads (d_model must divide evenly); causal: mask later positions;
    dropout: dropout on the attention output projection (0 in benchmarks).
    """

    d_model: int = 256
    n_heads: int = 4
    causal: bool = False
    dropout: float = 0.0

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent."""
        if self.d_model <= 0 or self.n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive, got {self.d_model}, {self.n_heads}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ValueError when this configuration cannot run at `seq_len` tokens (e.g. LSH's chunk
        length must divide it). Suites call it for every length before anything runs; modules call
        it in forward. Any length by default."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class AttentionModule(nn.Module):
    """Base for attention variants: fused input projection, head split/merge, output projection.

    `n_inputs` is 2 for shared-QK (qk, v) and 3 for separate (q, k, v). Subclasses implement
    `attend(*heads) -> [batch, heads, seq_len, head_dim]`, `core_flops(batch, seq_len)` and
    `core_bytes(batch, seq_len, element_size)` (variants/traffic.py).
    A variant whose core has several implementations sets `attention_backend` (a short description
    of the one its last forward ran); benchmark rows record it in their `attention_backend` column.
    """

    attention_backend: str | None = None

    def __init__(self, config: AttentionConfig, n_inputs: int):
        super().__init__()
        self.config = config
        self.n_inputs = n_inputs
        self.in_proj = nn.Linear(config.d_model, n_inputs * config.d_model, bias=False)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def split_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, L, d_model] -> n_inputs tensors of [B, heads, L, head_dim]."""
        batch, seq_len, _ = x.shape
        projected = self.in_proj(x).view(batch, seq_len, self.n_inputs, self.config.n_heads, self.config.head_dim)
        return list(projected.permute(2, 0, 3, 1, 4).unbind(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq_len, d_model] -> [batch, seq_len, d_model]."""
        batch, seq_len, d_model = x.shape
        heads = self.attend(*self.split_heads(x))
        merged = heads.transpose(1, 2).reshape(batch, seq_len, d_model)
        return self.dropout(self.out_proj(merged))

    def attend(self, *heads: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def core_flops(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of `attend` alone (2 per multiply-add)."""
        raise NotImplementedError

    def flops(self, batch: int, seq_len: int) -> int:
        """Analytic forward FLOPs (2 per multiply-add) of the whole layer on [batch, seq_len, d_model]."""
        d = self.config.d_model
        projections = 2 * batch * seq_len * d * d * (self.n_inputs + 1)
        return projections + self.core_flops(batch, seq_len)

    def core_bytes(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """Bytes `attend` alone reads and writes per forward and backward (variants/traffic.py)."""
        raise NotImplementedError

    def bytes_moved(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """Analytic bytes read and written per forward and per backward of the whole layer on
        [batch, seq_len, d_model] in `element_size`-byte elements: the input projection, `attend`
        (`core_bytes`), the head merge (a copy: [B, H, L, dh] -> [B, L, d]) and the output
        projection (variants/traffic.py)."""
        d, rows = self.config.d_model, batch * seq_len
        projections = linear(rows, d, self.n_inputs * d, element_size) + linear(rows, d, d, element_size)
        merge = pointwise(rows * d, element_size)
        return projections + merge + self.core_bytes(batch, seq_len, element_size)
