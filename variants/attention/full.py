"""Full (quadratic) attention: the `full_attention` functional core and variants `full` and `sdpa`.

`full` materialises the [seq_len, seq_len] logits and is the reference every other variant is
checked against. `sdpa` computes the same thing with `torch.nn.functional.scaled_dot_product_attention`
so torch can pick a flash / memory-efficient kernel.

Shared-QK (Reformer section 2): queries and keys come from one projection; the keys are the
length-normalised queries and a position may attend to itself only when nothing else is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from variants.attention.base import AttentionConfig, AttentionModule
from variants.registry import register
from variants.traffic import Traffic, fused_attention, matmul, pointwise, softmax


def mask_values(dtype: torch.dtype) -> tuple[float, float]:
    """(mask value, self-attention penalty) that replace masked logits of `dtype`.

    -1e9 / -1e5 as in trax and HuggingFace; fp16 cannot hold those (max 65504), so -1e4 / -1e3 there.
    """
    if dtype == torch.float16:
        return -1e4, -1e3
    return -1e9, -1e5


def shared_qk_key_scale(qk: torch.Tensor) -> torch.Tensor:
    """s = 1 / sqrt(mean(qk^2) + 1e-6) / sqrt(head_dim) per vector, so the key is s * qk: [..., head_dim] -> [..., 1]."""
    return torch.rsqrt(qk.pow(2).mean(dim=-1, keepdim=True) + 1e-6) / math.sqrt(qk.shape[-1])


def shared_qk_keys(qk: torch.Tensor) -> torch.Tensor:
    """Keys of shared-QK attention: qk / sqrt(mean(qk^2) + 1e-6) / sqrt(head_dim), per vector.

    qk: [..., head_dim] -> same shape. Each key has (almost exactly) unit length, so the logit
    q . k is |q| cos(q, k): the usual 1/sqrt(head_dim) scaling is folded into the keys.
    """
    return qk * shared_qk_key_scale(qk)


def shared_qk_keys_backward(
    qk: torch.Tensor, grad_keys: torch.Tensor, scale: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient w.r.t. qk [..., head_dim] of sum(grad_keys * shared_qk_keys(qk)) (same shape).

    With k = s q, s = `shared_qk_key_scale(q)` (pass it as `scale` when known; s^2 = 1 / (d (mean(q^2) + 1e-6))):
    dq = s dk - q (q . dk) s^3. Written into `out` when given.
    """
    if scale is None:
        scale = shared_qk_key_scale(qk)
    # (q . dk) s^3 one factor at a time: s^3 alone overflows float16 for short vectors (s > 40).
    dot = (qk * grad_keys).sum(dim=-1, keepdim=True).mul_(scale).mul_(scale).mul_(scale)
    return torch.mul(grad_keys, scale, out=out).addcmul_(qk, dot, value=-1)


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    shared_qk: bool = False,
    mask_self: bool = True,
    normalize_keys: bool = True,
) -> torch.Tensor:
    """Materialised softmax(logits) @ v on [batch, heads, seq_len, head_dim] tensors.

    Without shared_qk: logits = q . k / sqrt(head_dim). With shared_qk the `k` argument is ignored
    (callers pass q again) and the keys are `shared_qk_keys(q)`; logits = q . k_hat with no other
    scaling, and the self logit is replaced by a finite penalty (-1e5, fp16 -1e3) so a position
    attends to itself only when nothing else is allowed. Causal: logits of later positions are
    replaced by -1e9 (fp16 -1e4) first, then the self penalty is applied (as HuggingFace does).
    With shared_qk, `mask_self=False` drops the self penalty and `normalize_keys=False` uses the
    queries themselves as keys (logits q . q / sqrt(head_dim)); both off is trax's plain
    dot-product attention over one shared projection (docs/decisions.md, "Table 2's full column").
    Returns [batch, heads, seq_len, head_dim].
    """
    seq_len = q.shape[-2]
    mask_value, self_value = mask_values(q.dtype)
    if shared_qk and normalize_keys:
        logits = q @ shared_qk_keys(q).transpose(-1, -2)
    elif shared_qk:
        logits = q @ q.transpose(-1, -2) / math.sqrt(q.shape[-1])
    else:
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    positions = torch.arange(seq_len, device=q.device)
    if causal:
        allowed = positions[:, None] >= positions[None, :]
        logits = logits.masked_fill(~allowed, mask_value)
    if shared_qk and mask_self:
        logits = logits.masked_fill(positions[:, None] == positions[None, :], self_value)
    return torch.softmax(logits, dim=-1) @ v


def full_attention_bytes(
    batches: int,
    seq_len: int,
    head_dim: int,
    element_size: int,
    *,
    scaled: bool = True,
    masks: int = 0,
    normalize_keys: bool = False,
    keys: int | None = None,
) -> Traffic:
    """Bytes of `full_attention` run op by op on [batches, seq_len, head_dim] operands (batches =
    batch x heads; variants/traffic.py): QK^T writes the [seq_len, keys] logits, `scaled` divides
    them by sqrt(head_dim) (one more pass), each of `masks` masked_fills is a pass, softmax reads and
    writes them, and PV reads the probabilities. `normalize_keys`: the shared-QK keys are computed
    from the queries first (a pass over [batches, seq_len, head_dim]). `keys` defaults to seq_len."""
    keys = seq_len if keys is None else keys
    scores = batches * seq_len * keys
    out = matmul(batches, seq_len, head_dim, keys, element_size) + softmax(scores, element_size)
    out = out + matmul(batches, seq_len, keys, head_dim, element_size)
    out = out + pointwise(scores, element_size).times(int(scaled) + masks)
    if normalize_keys:
        out = out + pointwise(batches * seq_len * head_dim, element_size, saved=1)
    return out


@dataclass
class FullAttentionConfig(AttentionConfig):
    """AttentionConfig plus shared_qk: one projection for queries and keys (Reformer-style), and for
    shared-QK attention only: mask_self (a position attends to itself only when nothing else is
    allowed, as LSH attention does) and normalize_keys (keys are the length-normalised queries).
    Turning both off gives the shared-QK full attention the Reformer paper evaluated LSH-trained
    models with in Table 2 (trax's dot-product attention over q = k)."""

    shared_qk: bool = False
    mask_self: bool = True
    normalize_keys: bool = True

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent (the shared-QK options without shared_qk)."""
        super().validate()
        if not self.shared_qk and not (self.mask_self and self.normalize_keys):
            raise ValueError(
                "mask_self and normalize_keys apply to shared-QK attention only (separate Q and K never mask "
                "self and scale by 1/sqrt(head_dim)): set shared_qk: true, or leave them at true"
            )


@register("full", config=FullAttentionConfig)
class FullAttention(AttentionModule):
    """Full attention with the [seq_len, seq_len] logits materialised (the reference variant)."""

    def __init__(self, config: FullAttentionConfig):
        super().__init__(config, n_inputs=2 if config.shared_qk else 3)

    def attend(self, *heads: torch.Tensor) -> torch.Tensor:
        """(q, k, v) or (qk, v), each [batch, heads, seq_len, head_dim] -> same shape."""
        if self.config.shared_qk:
            qk, v = heads
            config = self.config
            return full_attention(
                qk, qk, v, causal=config.causal, shared_qk=True, mask_self=config.mask_self, normalize_keys=config.normalize_keys
            )
        q, k, v = heads
        return full_attention(q, k, v, causal=self.config.causal)

    def core_flops(self, batch: int, seq_len: int) -> int:
        """QK^T and PV matmuls over all seq_len^2 pairs (causal computes them all too)."""
        return 2 * 2 * batch * seq_len * seq_len * self.config.d_model

    def core_bytes(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """`full_attention_bytes`: logits and probabilities [seq_len, seq_len] per head, materialised."""
        c = self.config
        masks = int(c.causal) + int(c.shared_qk and c.mask_self)
        normalized = c.shared_qk and c.normalize_keys
        return full_attention_bytes(
            batch * c.n_heads, seq_len, c.head_dim, element_size, scaled=not normalized, masks=masks, normalize_keys=normalized
        )


@dataclass
class SdpaAttentionConfig(AttentionConfig):
    """AttentionConfig plus shared_qk (see FullAttentionConfig)."""

    shared_qk: bool = False


@register("sdpa", config=SdpaAttentionConfig)
class SdpaAttention(AttentionModule):
    """Full attention through torch's scaled_dot_product_attention (flash / mem-efficient kernels).

    Without shared_qk it uses `is_causal`, so torch may pick a fused kernel. With shared_qk it passes
    the normalised keys, scale=1.0 and an additive [seq_len, seq_len] float mask (causal -1e9 plus
    the self penalty -1e5; fp16 -1e4 / -1e3), which rules out the flash kernel. The penalty is added
    rather than substituted as in `full`; both leave the self weight at exp(-1e5) ~ 0 unless the
    position has nothing else to attend to, where both give weight 1, so the outputs agree.
    """

    def __init__(self, config: SdpaAttentionConfig):
        super().__init__(config, n_inputs=2 if config.shared_qk else 3)

    def attend(self, *heads: torch.Tensor) -> torch.Tensor:
        """(q, k, v) or (qk, v), each [batch, heads, seq_len, head_dim] -> same shape."""
        if not self.config.shared_qk:
            q, k, v = heads
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.config.causal)
        qk, v = heads
        seq_len = qk.shape[-2]
        mask_value, self_value = mask_values(qk.dtype)
        positions = torch.arange(seq_len, device=qk.device)
        bias = torch.zeros(seq_len, seq_len, device=qk.device, dtype=qk.dtype)
        if self.config.causal:
            bias = bias.masked_fill(positions[:, None] < positions[None, :], mask_value)
        bias = bias.masked_fill(positions[:, None] == positions[None, :], self_value)
        return F.scaled_dot_product_attention(qk, shared_qk_keys(qk), v, attn_mask=bias, scale=1.0)

    def core_flops(self, batch: int, seq_len: int) -> int:
        """QK^T and PV matmuls; halved for the is_causal path, whose fused kernels skip masked blocks."""
        flops = 2 * 2 * batch * seq_len * seq_len * self.config.d_model
        return flops // 2 if self.config.causal and not self.config.shared_qk else flops

    def core_bytes(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """A fused kernel (`fused_attention`: q, k, v read, the output and its logsumexp written); with
        shared_qk also the key normalisation and the additive [seq_len, seq_len] mask, read by every
        batch and head in forward and in backward."""
        c = self.config
        batches = batch * c.n_heads
        out = fused_attention(batches, seq_len, c.head_dim, element_size)
        if c.shared_qk:
            out = out + pointwise(batches * seq_len * c.head_dim, element_size, saved=1)
            mask = batches * seq_len * seq_len * element_size
            out = out + Traffic(mask, mask)
        return out
