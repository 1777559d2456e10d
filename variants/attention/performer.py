"""Performer attention, FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers",
arXiv 2009.14794): the `performer_attention` functional core and variant `performer`.

The softmax kernel exp(q . k / sqrt(d)) is estimated with m positive orthogonal random features
(paper eq. 5 / Lemma 1, section 2.4):

    phi(x) = exp(w_i . x - |x|^2 / 2) / sqrt(m), i = 1..m,   x = q / d^(1/4) or k / d^(1/4)

with w_1..w_m orthogonal within blocks of d (QR of a Gaussian matrix, signs fixed so each block is
Haar-distributed) and rescaled to the norms of Gaussian vectors, so each w_i is marginally N(0, I_d)
(`orthogonal_random_features`). Attention is then the linear form D^-1 (phi(Q) (phi(K)^T V)) of
`variants.attention.linear.kernel_attention`; causal by its chunked prefix sums, never [L, L].

Numerical stability as in the authors' JAX code (google-research performer/fast_attention) and
performer-pytorch: before exp, subtract a max of w . x -- per query over its features; over all
features and positions for the keys (one constant per batch and head) -- and add eps = 1e-6 inside:
phi = (exp(w . x - |x|^2 / 2 - max) + eps) / sqrt(m). The constants cancel in the ratio. Causal keys
cannot use a max over all positions (later keys would change earlier outputs through eps and
rounding), so there the max is a running one: key j subtracts the largest w . x of keys 0..j, and
the prefix sums carry exp(s_j - s_i) <= 1 between rows (`kernel_attention(key_log_scale=...)`).

Features: `feature_seed` None draws them from torch's global CPU RNG when the layer is built,
an int from a generator seeded with it (every build alike). One draw is shared by all heads (as
performer-pytorch). They are a non-persistent buffer, so the state dict is `full`'s exactly. With
`redraw`, every forward in training mode draws new ones from the global CPU RNG (paper section 4.2
redraws periodically; performer-pytorch every 1000 calls by default): seeded runs repeat, and a
reversible layer's backward recomputation, which restores the RNG, sees the same features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from variants.attention.base import AttentionConfig, AttentionModule
from variants.attention.linear import kernel_attention, kernel_attention_bytes, kernel_attention_flops
from variants.registry import register
from variants.traffic import Traffic, matmul, pointwise

KERNEL_EPS = 1e-6  # the JAX code's numerical_stabilizer (performer-pytorch uses 1e-4)


def orthogonal_random_features(n_features: int, head_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """FAVOR+ projections w: [n_features, head_dim], float64 on the CPU.

    Blocks of head_dim orthonormal rows (Q of a QR of a Gaussian matrix, times sign(diag R): Haar),
    the last block cut to fit, each row scaled to the norm of an independent N(0, I) vector.
    `generator` None draws from the global CPU RNG.
    """
    gaussian = torch.randn(math.ceil(n_features / head_dim), head_dim, head_dim, generator=generator, dtype=torch.float64, device="cpu")
    q, r = torch.linalg.qr(gaussian)  # [blocks, d, d] each
    haar = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # column c times sign(r_cc)
    directions = haar.transpose(-1, -2).reshape(-1, head_dim)[:n_features]  # rows orthonormal within a block
    norms = torch.randn(n_features, head_dim, generator=generator, dtype=torch.float64, device="cpu").norm(dim=1, keepdim=True)
    return directions * norms


def favor_features(
    x: torch.Tensor, features: torch.Tensor, *, is_query: bool, causal: bool = False, eps: float = KERNEL_EPS
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positive random features of queries or keys: x [batch, heads, seq_len, head_dim], features
    [m, head_dim] -> (phi [batch, heads, seq_len, m], log_scale).

    phi = (exp(w . x' - |x'|^2 / 2 - c) + eps) / sqrt(m), x' = x / head_dim^(1/4), c (detached) the
    max of w . x' per query row, or for keys over all rows (non-causal) or over rows 0..j (causal).
    log_scale: None, or for causal keys c as [batch, heads, seq_len] (the key_log_scale of
    `kernel_attention`).
    """
    x = x * x.shape[-1] ** -0.25
    projected = x @ features.to(x.dtype).T  # [B, H, L, m]: w . x'
    half_norm = x.pow(2).sum(dim=-1, keepdim=True) / 2  # [B, H, L, 1]
    log_scale = None
    if is_query:
        stabiliser = projected.detach().amax(dim=-1, keepdim=True)
    elif not causal:
        stabiliser = projected.detach().amax(dim=(-1, -2), keepdim=True)
    else:
        log_scale = projected.detach().amax(dim=-1).cummax(dim=-1).values  # [B, H, L], non-decreasing
        stabiliser = log_scale[..., None]
    shifted = projected.sub_(half_norm + stabiliser)  # in place: the matmul does not keep its output
    scale = 1.0 / math.sqrt(features.shape[0])
    return PositiveFeatures.apply(shifted, scale, eps * scale), log_scale


class PositiveFeatures(torch.autograd.Function):
    """phi = exp(z) * scale + offset (z any shape, scale and offset floats), keeping only phi for the
    backward: d phi / d z = phi - offset. Autograd of the plain expression would keep exp(z) and phi,
    two [batch, heads, seq_len, m] tensors per call where one suffices."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, scale: float, offset: float) -> torch.Tensor:  # noqa: D102
        phi = torch.exp(z).mul_(scale).add_(offset)
        ctx.save_for_backward(phi)
        ctx.offset = offset
        return phi

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: D102
        (phi,) = ctx.saved_tensors
        return grad * (phi - ctx.offset), None, None


def performer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    features: torch.Tensor,
    *,
    causal: bool = False,
    kernel_eps: float = KERNEL_EPS,
    chunk_size: int = 64,
) -> torch.Tensor:
    """FAVOR+ attention: q, k, v [batch, heads, seq_len, head_dim], features [m, head_dim] -> [batch,
    heads, seq_len, head_dim]; an unbiased-kernel estimate of softmax(q k^T / sqrt(head_dim)) v.

    No eps in the normaliser (it is positive: every feature is >= kernel_eps / sqrt(m)).
    """
    phi_q, _ = favor_features(q, features, is_query=True, eps=kernel_eps)
    phi_k, log_scale = favor_features(k, features, is_query=False, causal=causal, eps=kernel_eps)
    return kernel_attention(phi_q, phi_k, v, causal=causal, eps=0.0, chunk_size=chunk_size, key_log_scale=log_scale)


@dataclass
class PerformerAttentionConfig(AttentionConfig):
    """AttentionConfig plus FAVOR+ settings.

    n_features: random features m; feature_seed: seed of the features drawn at build (None -> the
    global RNG); redraw: new features on every forward in training mode (from the global RNG);
    chunk_size: causal prefix-sum chunk (positions).
    """

    n_features: int = 256
    feature_seed: int | None = None
    redraw: bool = False
    chunk_size: int = 64

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent."""
        super().validate()
        if self.n_features < 1:
            raise ValueError(f"n_features must be positive, got {self.n_features}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")


@register("performer", config=PerformerAttentionConfig)
class PerformerAttention(AttentionModule):
    """Performer FAVOR+ attention: positive orthogonal random features, causal by prefix sums."""

    def __init__(self, config: PerformerAttentionConfig):
        super().__init__(config, n_inputs=3)
        generator = None if config.feature_seed is None else torch.Generator().manual_seed(config.feature_seed)
        features = orthogonal_random_features(config.n_features, config.head_dim, generator)
        self.register_buffer("features", features.to(torch.get_default_dtype()), persistent=False)  # [m, head_dim]

    def redraw_features(self) -> None:
        """Replace the features by a fresh draw from the global CPU RNG (same device and dtype)."""
        features = orthogonal_random_features(self.config.n_features, self.config.head_dim)
        self.features = features.to(self.features)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [batch, heads, seq_len, head_dim] -> same shape (features redrawn first when
        `redraw` and training)."""
        if self.config.redraw and self.training:
            self.redraw_features()
        c = self.config
        return performer_attention(q, k, v, self.features, causal=c.causal, chunk_size=c.chunk_size)

    def core_flops(self, batch: int, seq_len: int) -> int:
        """The feature projections of q and k (w . x) plus the matmuls of `kernel_attention` with m features."""
        c = self.config
        projections = 2 * 2 * batch * seq_len * c.d_model * c.n_features
        return projections + kernel_attention_flops(batch * c.n_heads, seq_len, c.n_features, c.head_dim, c.causal, c.chunk_size)

    def core_bytes(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """The random-feature projections of q and k ([seq_len, head_dim] x [head_dim, n_features]
        per head) and their positive features (exp, a pass over [seq_len, n_features] each, saved for
        backward), then `kernel_attention_bytes` with n_features features (causal: key scales)."""
        c = self.config
        batches = batch * c.n_heads
        projections = matmul(batches, seq_len, c.head_dim, c.n_features, element_size, b_grad=False).times(2)
        features = pointwise(batches * seq_len * c.n_features, element_size, saved=1).times(2)
        kernel = kernel_attention_bytes(batches, seq_len, c.n_features, c.head_dim, element_size, c.causal, c.chunk_size, decay=c.causal)
        return projections + features + kernel
