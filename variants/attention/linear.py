"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", arXiv 2006.16236) and its
feature-map-agnostic core `kernel_attention`, shared with `performer`.

With a positive feature map phi (here elu(x) + 1, the paper's eq. 7) softmax(q k^T) is replaced by
phi(q) phi(k)^T, so (paper eq. 5-6)

    V'_i = phi(Q_i) sum_j phi(K_j) V_j^T / (phi(Q_i) . sum_j phi(K_j) + eps)

with j over all positions (non-causal) or j <= i (causal, eq. 8-9: running sums S_i = S_{i-1} +
phi(K_i) V_i^T, Z_i = Z_{i-1} + phi(K_i)). eps = 1e-6 as the authors' fast-transformers code.

Causal form, and why: prefix sums by chunks of `chunk_size` positions with a running
[feature_dim, head_dim + 1] state (the value columns plus a ones column for the normaliser Z).
Within a chunk the pairs j <= i are a masked [chunk, chunk] product, across chunks the state; no
[seq_len, feature_dim, head_dim] cumulative sum and no [seq_len, seq_len] matrix exists. Plain
autograd then saves per chunk its [chunk, chunk] scores and the incoming state, i.e. seq_len *
chunk + (seq_len / chunk) * feature_dim * (head_dim + 1) numbers per head: linear in length, so
no custom autograd.Function is needed (its only gain would be the O(chunk^2) scores, recomputable).

`key_log_scale` lets a caller store keys divided by a per-position factor exp(s_j) that grows
along the sequence (Performer's causal stabiliser): weights become phi(q_i) . phi(k_j) exp(s_j -
s_i), every factor <= 1, and the common factor exp(-s_i) of row i cancels in the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from variants.attention.base import AttentionConfig, AttentionModule
from variants.registry import register
from variants.traffic import Traffic, matmul, pointwise


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1, elementwise (> 0): [..., head_dim] -> same shape."""
    return F.elu(x) + 1


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """[..., seq_len, head_dim] -> [..., seq_len, head_dim + 1]: a ones column carries the normaliser."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _normalise(numerator: torch.Tensor, eps: float) -> torch.Tensor:
    """[..., head_dim + 1] (value sums, then the normaliser) -> [..., head_dim]: sums / (normaliser + eps)."""
    return numerator[..., :-1] / (numerator[..., -1:] + eps)


def kernel_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    key_log_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """phi(Q) (phi(K)^T V) / (phi(Q) sum phi(K) + eps) with features already applied.

    phi_q, phi_k: [batch, heads, seq_len, features] (non-negative); v: [batch, heads, seq_len,
    head_dim] -> [batch, heads, seq_len, head_dim]. Causal: sums over j <= i, chunked prefix sums
    (module docstring). key_log_scale: [batch, heads, seq_len], non-decreasing along seq_len, causal
    only (the true key features are phi_k * exp(key_log_scale)); None means 0.
    """
    values = _with_ones(v)  # [B, H, L, D + 1]
    if not causal:
        state = phi_k.transpose(-1, -2) @ values  # [B, H, F, D + 1]
        return _normalise(phi_q @ state, eps)
    return _normalise(_causal_sums(phi_q, phi_k, values, chunk_size, key_log_scale), eps)


def _causal_sums(
    phi_q: torch.Tensor, phi_k: torch.Tensor, values: torch.Tensor, chunk_size: int, log_scale: torch.Tensor | None
) -> torch.Tensor:
    """sum_{j <= i} (phi_q_i . phi_k_j) exp(s_j - s_i) values_j for every i: [B, H, L, D + 1].

    One chunk at a time: the masked [chunk, chunk] block inside it, the state of earlier chunks
    (scaled to exp(-s) at the end of the previous chunk) for the rest, then the state moves on.
    """
    batch, heads, seq_len, features = phi_k.shape
    state = values.new_zeros(batch, heads, features, values.shape[-1])  # [B, H, F, D + 1]
    state_scale = values.new_zeros(batch, heads, 1, 1)  # s at the end of the previous chunk
    outputs = []
    for start in range(0, seq_len, chunk_size):
        stop = min(start + chunk_size, seq_len)
        q, k, val = phi_q[..., start:stop, :], phi_k[..., start:stop, :], values[..., start:stop, :]
        scores = q @ k.transpose(-1, -2)  # [B, H, C, C]
        later = torch.ones(stop - start, stop - start, dtype=torch.bool, device=q.device).triu(1)
        first, last = start == 0, stop == seq_len  # no state to read yet / none to pass on
        if log_scale is None:
            out = scores.masked_fill(later, 0.0) @ val
            if not first:
                out = out + q @ state
            if not last:
                state = state + k.transpose(-1, -2) @ val
        else:
            s = log_scale[..., start:stop]  # [B, H, C]
            decay = (s[..., None, :] - s[..., :, None]).masked_fill(later, -torch.inf).exp()  # exp(s_j - s_i), 0 above
            out = (scores * decay) @ val
            if not first:  # the state is scaled to exp(-state_scale), state_scale <= s_i
                out = out + (q @ state) * (state_scale - s[..., :, None]).exp()
            if not last:
                end = s[..., -1:, None]  # [B, H, 1, 1]
                k_scaled = k * (s[..., None] - end).exp()
                state = k_scaled.transpose(-1, -2) @ val + (0.0 if first else state * (state_scale - end).exp())
                state_scale = end
        outputs.append(out)
    return torch.cat(outputs, dim=-2)


def kernel_attention_flops(batch_heads: int, seq_len: int, features: int, head_dim: int, causal: bool, chunk_size: int) -> int:
    """Forward FLOPs (2 per multiply-add) of the matmuls `kernel_attention` runs, over batch * heads."""
    width = head_dim + 1  # the ones column for the normaliser
    if not causal:
        return batch_heads * 2 * 2 * seq_len * features * width
    total = 0
    for start in range(0, seq_len, chunk_size):
        c = min(chunk_size, seq_len - start)
        total += 2 * c * c * features + 2 * c * c * width  # scores, scores @ values
        total += 2 * c * features * width * ((start > 0) + (start + c < seq_len))  # q @ state, state update
    return batch_heads * total


def kernel_attention_bytes(
    batches: int, seq_len: int, features: int, head_dim: int, element_size: int, causal: bool, chunk_size: int, decay: bool = False
) -> Traffic:
    """Bytes of `kernel_attention` op by op (variants/traffic.py) on [batches, seq_len, features]
    feature maps and [batches, seq_len, head_dim] values: the ones column appended to v, then
    non-causal the [features, head_dim + 1] state and phi(q) times it; causal, per chunk the
    [chunk, chunk] scores (masked; with `decay` also scaled), times the values, phi(q) times the
    state and the state's update; and the normalisation."""
    width = head_dim + 1
    out = pointwise(batches * seq_len * width, element_size) + pointwise(batches * seq_len * width, element_size, inputs=1)
    if not causal:
        return out + matmul(batches, features, seq_len, width, element_size) + matmul(batches, seq_len, features, width, element_size)
    for start in range(0, seq_len, chunk_size):
        c = min(chunk_size, seq_len - start)
        scores = batches * c * c
        out = out + matmul(batches, c, features, c, element_size) + pointwise(scores, element_size).times(2 if decay else 1)
        out = out + matmul(batches, c, c, width, element_size)
        if start > 0:
            out = out + matmul(batches, c, features, width, element_size) + pointwise(batches * c * width, element_size, inputs=2)
        if start + c < seq_len:
            out = out + matmul(batches, features, c, width, element_size) + pointwise(batches * features * width, element_size, inputs=2)
    return out + pointwise(batches * seq_len * width, element_size)  # the chunks concatenated


@dataclass
class LinearAttentionConfig(AttentionConfig):
    """AttentionConfig plus eps (added to the normaliser) and chunk_size (causal prefix-sum chunk)."""

    eps: float = 1e-6
    chunk_size: int = 64

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent."""
        super().validate()
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")


@register("linear", config=LinearAttentionConfig)
class LinearAttention(AttentionModule):
    """Linear attention with phi = elu + 1 (Katharopoulos et al. 2020); causal by chunked prefix sums."""

    def __init__(self, config: LinearAttentionConfig):
        super().__init__(config, n_inputs=3)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [batch, heads, seq_len, head_dim] -> same shape."""
        c = self.config
        return kernel_attention(elu_feature_map(q), elu_feature_map(k), v, causal=c.causal, eps=c.eps, chunk_size=c.chunk_size)

    def core_flops(self, batch: int, seq_len: int) -> int:
        """The matmuls of `kernel_attention` with head_dim features (elementwise work not counted)."""
        c = self.config
        return kernel_attention_flops(batch * c.n_heads, seq_len, c.head_dim, c.head_dim, c.causal, c.chunk_size)

    def core_bytes(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """The feature maps elu + 1 of q and k (two passes each), then `kernel_attention_bytes`."""
        c = self.config
        batches = batch * c.n_heads
        maps = pointwise(batches * seq_len * c.head_dim, element_size, saved=1).times(4)
        return maps + kernel_attention_bytes(batches, seq_len, c.head_dim, c.head_dim, element_size, c.causal, c.chunk_size)
