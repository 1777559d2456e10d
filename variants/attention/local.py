"""Blocked local attention with look-back: the `local_attention` functional core and variant `local`.

The sequence is cut into blocks of `window` positions; the queries of a block attend to the keys of
their own block, the `look_back` blocks before it and (non-causal only) the `look_forward` blocks
after it. This is the "local attention" of Long Range Arena (Tay et al. 2020, arXiv 2011.04006) in
the form of lucidrains' `local-attention` package (window_size, look_backward, look_forward), itself
the blocked local attention of Image Transformer (Parmar et al. 2018, arXiv 1802.05751) and of the
Reformer paper's local baselines. A causal block sees `look_back` * window to (look_back + 1) *
window - 1 earlier positions.

Memory: the logits are [batch, heads, seq_len, (look_back + 1 + look_forward) * window], never
[seq_len, seq_len]. Lengths that are not a multiple of `window` are padded at the end; the padded
keys (and the blocks before the first / after the last) are masked, the padded queries dropped.

Masks follow `full_attention` exactly, so with window >= seq_len the layer equals `full` with the
same weights: softmax scale 1 / sqrt(head_dim); causal logits of later positions -1e9; shared-QK
(keys `shared_qk_keys(q)`, no other scaling) self logit -1e5, fp16 -1e4 / -1e3 (`mask_values`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from variants.attention.base import AttentionConfig, AttentionModule
from variants.attention.full import mask_values, shared_qk_keys
from variants.registry import register
from variants.traffic import Traffic, matmul, pointwise, softmax


def look_around(blocks: torch.Tensor, back: int, forward: int, fill: float = 0.0) -> torch.Tensor:
    """Each block beside its neighbours: [..., n_blocks, window, dim] -> [..., n_blocks, (back + 1 + forward) * window, dim].

    Block b gets blocks b - back .. b + forward concatenated along the window axis, in order;
    neighbours before the first / after the last block are filled with `fill`.
    """
    padded = F.pad(blocks, (0, 0, 0, 0, back, forward), value=fill)  # pad the block axis
    n_blocks = blocks.shape[-3]
    return torch.cat([padded[..., i : i + n_blocks, :, :] for i in range(back + 1 + forward)], dim=-2)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    look_back: int = 1,
    look_forward: int = 0,
    causal: bool = False,
    shared_qk: bool = False,
) -> torch.Tensor:
    """Blocked local softmax attention on [batch, heads, seq_len, head_dim] tensors -> same shape.

    Position i (block b = i // window) attends to the positions of blocks b - look_back .. b +
    look_forward that exist, restricted to j <= i when causal. Logits, masks and the shared-QK
    convention (`k` ignored, keys `shared_qk_keys(q)`) are those of `full_attention`. seq_len need
    not be a multiple of window (padded, then cut).
    """
    batch, heads, seq_len, head_dim = q.shape
    n_blocks = math.ceil(seq_len / window)
    pad = n_blocks * window - seq_len
    mask_value, self_value = mask_values(q.dtype)
    if shared_qk:
        keys, queries = shared_qk_keys(q), q
    else:
        keys, queries = k, q / math.sqrt(head_dim)

    def blocked(x: torch.Tensor) -> torch.Tensor:  # [B, H, L, D] -> [B, H, n_blocks, window, D]
        return F.pad(x, (0, 0, 0, pad)).view(batch, heads, n_blocks, window, x.shape[-1])

    q_blocks = blocked(queries)  # [B, H, n, W, D]
    k_near = look_around(blocked(keys), look_back, look_forward)  # [B, H, n, S * W, D]
    v_near = look_around(blocked(v), look_back, look_forward)
    logits = q_blocks @ k_near.transpose(-1, -2)  # [B, H, n, W, S * W]

    positions = torch.arange(n_blocks * window, device=q.device).view(n_blocks, window, 1)
    q_pos = positions  # [n, W, 1]
    k_pos = look_around(positions, look_back, look_forward, fill=-1).transpose(-1, -2)  # [n, 1, S * W]
    missing = (k_pos < 0) | (k_pos >= seq_len)  # outside the sequence, or padding
    if causal:
        missing = missing | (k_pos > q_pos)
    logits = logits.masked_fill(missing, mask_value)
    if shared_qk:
        logits = logits.masked_fill(k_pos == q_pos, self_value)
    out = torch.softmax(logits, dim=-1) @ v_near  # [B, H, n, W, D]
    return out.reshape(batch, heads, n_blocks * window, head_dim)[:, :, :seq_len]


@dataclass
class LocalAttentionConfig(AttentionConfig):
    """AttentionConfig plus the local window.

    window: block length (positions); look_back: earlier blocks each block also attends to;
    look_forward: later blocks (non-causal only); None -> look_back when non-causal (a symmetric
    window), 0 when causal. lucidrains' local-attention defaults to 1 for non-causal whatever
    look_backward is: the same for the default look_back=1. shared_qk: one projection for queries
    and keys, as `full`'s shared_qk.
    """

    window: int = 128
    look_back: int = 1
    look_forward: int | None = None
    shared_qk: bool = False

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent."""
        super().validate()
        if self.window < 1:
            raise ValueError(f"window must be positive, got {self.window}")
        if self.look_back < 0:
            raise ValueError(f"look_back must be >= 0, got {self.look_back}")
        if self.look_forward is not None and self.look_forward < 0:
            raise ValueError(f"look_forward must be >= 0, got {self.look_forward}")
        if self.causal and self.look_forward:
            raise ValueError(f"look_forward={self.look_forward} sees later blocks: a causal local layer needs look_forward 0 (or None)")

    @property
    def forward_blocks(self) -> int:
        """The look_forward in effect: as given, else look_back (non-causal) or 0 (causal)."""
        if self.look_forward is not None:
            return self.look_forward
        return 0 if self.causal else self.look_back


@register("local", config=LocalAttentionConfig)
class LocalAttention(AttentionModule):
    """Blocked local attention: each block attends to itself and `look_back` (+ `look_forward`) neighbours."""

    def __init__(self, config: LocalAttentionConfig):
        super().__init__(config, n_inputs=2 if config.shared_qk else 3)

    def attend(self, *heads: torch.Tensor) -> torch.Tensor:
        """(q, k, v) or (qk, v), each [batch, heads, seq_len, head_dim] -> same shape."""
        c = self.config
        q, k, v = (heads[0], heads[0], heads[1]) if c.shared_qk else heads
        return local_attention(
            q, k, v, window=c.window, look_back=c.look_back, look_forward=c.forward_blocks, causal=c.causal, shared_qk=c.shared_qk
        )

    def span(self) -> int:
        """Keys each query block is scored against: (look_back + 1 + look_forward) * window."""
        return (self.config.look_back + 1 + self.config.forward_blocks) * self.config.window

    def core_flops(self, batch: int, seq_len: int) -> int:
        """QK^T and PV of every (padded) query against its span of keys, masked ones included."""
        padded = math.ceil(seq_len / self.config.window) * self.config.window
        return 2 * 2 * batch * padded * self.span() * self.config.d_model

    def core_bytes(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """Op by op on the padded blocks: the queries scaled (or the shared-QK keys normalised), the
        keys and values of each block's span gathered (copies of span x window rows per block),
        the [window, span] logits, their mask, softmax and PV."""
        c = self.config
        batches = batch * c.n_heads
        padded = math.ceil(seq_len / c.window) * c.window
        blocks, span = batches * (padded // c.window), self.span()
        rows = batches * padded * c.head_dim
        gathers = pointwise(rows * (span // c.window), element_size).times(2)
        scores = blocks * c.window * span
        out = pointwise(rows, element_size, saved=int(c.shared_qk)) + gathers
        out = out + matmul(blocks, c.window, c.head_dim, span, element_size) + pointwise(scores, element_size)
        return out + softmax(scores, element_size) + matmul(blocks, c.window, span, c.head_dim, element_size)
