"""LSH attention (Reformer): the `lsh_attention` functional core, `hash_buckets` and variant `lsh`.

Exactly the trax / HuggingFace `LSHSelfAttention` algorithm (see docs and the reference notes):

1. hash: bucket = argmax(concat([x R, -x R])) per round on the detached shared qk vectors;
   round r's buckets are offset by r * n_buckets;
2. sort all n_hashes * seq_len items together, stably, by (bucket, position) -- round 0 first;
3. split that one sequence into chunks of bucket_size; each chunk attends to itself and to the
   chunk before it in the combined order, cyclically (the first chunk looks at the very last one,
   a round's first chunk at the previous round's last chunk);
4. keys are the length-normalised queries (`shared_qk_keys`); logits q . k with no other scaling;
   causal mask by original position (-1e9), then self penalty -1e5 (fp16: -1e4 / -1e3, as HF);
5. each round r gives o_r and the logsumexp z_r of its logits; unsort and combine
   out = sum_r softmax_r(z)_r * o_r.

Memory: the logits are [batch, heads, n_hashes * seq_len / bucket_size, bucket_size, 2 * bucket_size],
i.e. O(batch * heads * n_hashes * seq_len * 2 * bucket_size), never seq_len^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from variants.attention.base import AttentionConfig, AttentionModule
from variants.attention.full import full_attention, mask_values, shared_qk_keys
from variants.registry import register


def draw_rotations(
    heads: int,
    head_dim: int,
    n_hashes: int,
    n_buckets: int,
    *,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Random rotations [heads, head_dim, n_hashes, n_buckets // 2] drawn with torch.randn.

    With a seed they come from a fresh torch.Generator seeded with it (same seed -> same rotations,
    the global RNG is untouched; on CPU the same numbers HF draws after torch.manual_seed(seed)).
    Without one they come from torch's global RNG, so restoring its state (as the reversible
    residual does before recomputing) reproduces them.
    """
    shape = (heads, head_dim, n_hashes, n_buckets // 2)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device if device is not None else "cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def hash_buckets(qk: torch.Tensor, n_hashes: int, n_buckets: int, rotations: torch.Tensor) -> torch.Tensor:
    """Angular-LSH buckets of qk [batch, heads, seq_len, head_dim] -> [batch, heads, n_hashes, seq_len].

    rotations: [heads, head_dim, n_hashes, n_buckets // 2] or [head_dim, n_hashes, n_buckets // 2].
    Round r's buckets lie in [r * n_buckets, (r + 1) * n_buckets). No gradient flows through hashing.
    """
    if rotations.dim() == 3:
        rotations = rotations.unsqueeze(0).expand(qk.shape[1], -1, -1, -1)
    if rotations.shape[-2:] != (n_hashes, n_buckets // 2) or rotations.shape[:2] != (qk.shape[1], qk.shape[3]):
        raise ValueError(
            f"rotations of shape {tuple(rotations.shape)} do not fit heads={qk.shape[1]}, "
            f"head_dim={qk.shape[3]}, n_hashes={n_hashes}, n_buckets={n_buckets}"
        )
    rotated = torch.einsum("bhld,hdnr->bhnlr", qk.detach(), rotations.to(qk.dtype))
    buckets = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
    offsets = torch.arange(n_hashes, device=qk.device) * n_buckets
    return buckets + offsets[:, None]


def _look_back(x: torch.Tensor) -> torch.Tensor:
    """[B, H, n_chunks, chunk, ...] -> [B, H, n_chunks, 2 * chunk, ...]: chunk c-1 (cyclic), then chunk c."""
    return torch.cat([x.roll(1, dims=2), x], dim=3)


def _duplicate_counts(chunk_of: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """N_ij for every logit: how often key position j occurs in the windows of query position i.

    chunk_of: [B, H, n_hashes, seq_len] chunk (in the combined order) of each position's item per round;
    query_pos: [B, H, C, chunk]; key_pos: [B, H, C, 2 * chunk]. Returns [B, H, C, chunk, 2 * chunk].
    Query i's window in round r is chunks {c, c - 1} with c = chunk_of[r, i]; key j occurs there as its
    round-r item (chunk c or c - 1) or, when c - 1 belongs to round r - 1, as its round-(r-1) item.
    """
    batch, heads, n_hashes, _ = chunk_of.shape
    per_round = chunk_of.permute(0, 1, 3, 2)  # [B, H, L, n_hashes]

    def at(pos: torch.Tensor) -> torch.Tensor:  # [B, H, C, n] -> [B, H, C, n, n_hashes]
        flat = pos.reshape(batch, heads, -1, 1).expand(-1, -1, -1, n_hashes)
        return per_round.gather(2, flat).view(*pos.shape, n_hashes)

    c_query = at(query_pos).unsqueeze(-2)  # [B, H, C, chunk, 1, n_hashes]
    c_key = at(key_pos).unsqueeze(-3)  # [B, H, C, 1, 2 * chunk, n_hashes]
    before = (c_query - 1) % n_chunks
    counts = (c_key == c_query).sum(-1) + (c_key == before).sum(-1)
    if n_hashes > 1:  # key j's previous-round item in the chunk before a round's first chunk
        counts = counts + (c_key.roll(1, dims=-1) == before).sum(-1)
    return counts


def lsh_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    *,
    n_hashes: int,
    bucket_size: int,
    n_buckets: int | None = None,
    causal: bool = False,
    rotations: torch.Tensor | None = None,
    seed: int | None = None,
    dup_correction: bool = False,
) -> torch.Tensor:
    """Shared-QK LSH attention on qk, v [batch, heads, seq_len, head_dim] -> [batch, heads, seq_len, head_dim].

    n_buckets defaults to 2 * seq_len // bucket_size (or 2 * rotations.shape[-1]) and must be even.
    rotations: [heads, head_dim, n_hashes, n_buckets // 2] or [head_dim, n_hashes, n_buckets // 2];
    when None they are drawn by `draw_rotations` from `seed` or, without one, from the global RNG.
    seq_len must be a multiple of bucket_size; shorter sequences fall back to shared-QK full attention
    (HF does so for seq_len <= bucket_size; at seq_len == bucket_size the LSH path sees every key
    twice per window, which gives the same result).

    dup_correction (paper eq. 16, off in later trax and HF) subtracts log N_ij from each logit, where
    N_ij counts the occurrences of key position j in query position i's windows over all rounds
    (window = i's chunk and the chunk before it, cyclic, in the combined order; a key present in both
    chunks of one window counts twice). Then the output is exactly softmax attention over the union
    of i's candidates. Unlike Jan-2020 trax, N_ij >= 1 for every key in a window, so no logit ever
    gains +log(1e9). It costs an extra n_hashes-times-the-logits integer tensor.
    """
    batch, heads, seq_len, head_dim = qk.shape
    if n_hashes < 1 or bucket_size < 1:
        raise ValueError(f"n_hashes and bucket_size must be positive, got {n_hashes}, {bucket_size}")
    if rotations is not None:
        if rotations.shape[-2] != n_hashes:
            raise ValueError(f"rotations have {rotations.shape[-2]} rounds, n_hashes={n_hashes}")
        if n_buckets is None:
            n_buckets = 2 * rotations.shape[-1]
    if seq_len < bucket_size:
        return full_attention(qk, qk, v, causal=causal, shared_qk=True)
    if seq_len % bucket_size:
        raise ValueError(f"seq_len={seq_len} is not a multiple of bucket_size={bucket_size}")
    if n_buckets is None:
        n_buckets = 2 * seq_len // bucket_size
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"n_buckets must be even and at least 2, got {n_buckets}")
    if rotations is None:
        rotations = draw_rotations(heads, head_dim, n_hashes, n_buckets, seed=seed, device=qk.device, dtype=qk.dtype)

    n_items = n_hashes * seq_len
    n_chunks = n_items // bucket_size
    with torch.no_grad():
        buckets = hash_buckets(qk, n_hashes, n_buckets, rotations).flatten(2)  # [B, H, n_hashes * L]
        sort_idx = torch.sort(buckets, dim=-1, stable=True).indices  # item ids r * L + position
        undo_idx = torch.empty_like(sort_idx)
        undo_idx.scatter_(-1, sort_idx, torch.arange(n_items, device=qk.device).expand_as(sort_idx))
        positions = sort_idx % seq_len

    def gather_sorted(x: torch.Tensor) -> torch.Tensor:  # [B, H, L, d] -> [B, H, C, chunk, d]
        index = positions.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])
        return x.gather(2, index).view(batch, heads, n_chunks, bucket_size, x.shape[-1])

    query = gather_sorted(qk)
    keys = _look_back(gather_sorted(shared_qk_keys(qk)))  # [B, H, C, 2 * chunk, d]
    values = _look_back(gather_sorted(v))
    query_pos = positions.view(batch, heads, n_chunks, bucket_size)
    key_pos = _look_back(query_pos)

    logits = query @ keys.transpose(-1, -2)  # [B, H, C, chunk, 2 * chunk]
    mask_value, self_value = mask_values(logits.dtype)
    if causal:
        logits = logits.masked_fill(query_pos.unsqueeze(-1) < key_pos.unsqueeze(-2), mask_value)
    logits = logits.masked_fill(query_pos.unsqueeze(-1) == key_pos.unsqueeze(-2), self_value)
    if dup_correction:
        chunk_of = (undo_idx // bucket_size).view(batch, heads, n_hashes, seq_len)
        counts = _duplicate_counts(chunk_of, query_pos, key_pos, n_chunks)
        logits = logits - counts.to(logits.dtype).log()

    # softmax and logsumexp from one shifted exp. Normalising by the sum (not exp(logits - lse))
    # keeps a row exact when its max is ~ -1e5 (only the self logit allowed): fp32 cannot hold
    # -1e5 + log(2) to better than 4e-3. Detaching the shift leaves both gradients unchanged.
    shift = logits.amax(dim=-1, keepdim=True).detach()
    exp = torch.exp(logits - shift)
    total = exp.sum(dim=-1, keepdim=True)
    out = (exp / total) @ values  # [B, H, C, chunk, d]
    lse = shift + total.log()

    # Unsort: item r * L + i of round r, position i.
    out = out.view(batch, heads, n_items, head_dim).gather(2, undo_idx.unsqueeze(-1).expand(-1, -1, -1, head_dim))
    lse = lse.view(batch, heads, n_items).gather(2, undo_idx)
    out = out.view(batch, heads, n_hashes, seq_len, head_dim)
    lse = lse.view(batch, heads, n_hashes, seq_len, 1)
    weights = torch.exp(lse - lse.amax(dim=2, keepdim=True).detach())  # normalised by the sum, as above
    return (out * weights).sum(dim=2) / weights.sum(dim=2)


@dataclass
class LSHAttentionConfig(AttentionConfig):
    """AttentionConfig plus LSH parameters (always shared-QK).

    n_hashes: hashing rounds; bucket_size: chunk length; n_buckets: buckets per round (even; None ->
    2 * seq_len // bucket_size at forward time); seed: fixed rotations (None -> fresh ones drawn from
    the global RNG every forward); dup_correction: subtract log N_ij (paper eq. 16).
    """

    n_hashes: int = 1
    bucket_size: int = 64
    n_buckets: int | None = None
    seed: int | None = None
    dup_correction: bool = False

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent."""
        super().validate()
        if self.n_hashes < 1:
            raise ValueError(f"n_hashes must be positive, got {self.n_hashes}")
        if self.bucket_size < 1:
            raise ValueError(f"bucket_size must be positive, got {self.bucket_size}")
        if self.n_buckets is not None and (self.n_buckets < 2 or self.n_buckets % 2):
            raise ValueError(f"n_buckets must be even and at least 2, got {self.n_buckets}")


@register("lsh", config=LSHAttentionConfig)
class LSHAttention(AttentionModule):
    """Reformer LSH attention (shared QK, hashed and chunked; trax / HuggingFace semantics)."""

    def __init__(self, config: LSHAttentionConfig):
        super().__init__(config, n_inputs=2)

    def attend(self, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """qk, v: [batch, heads, seq_len, head_dim] -> same shape; rotations drawn per call."""
        c = self.config
        return lsh_attention(
            qk,
            v,
            n_hashes=c.n_hashes,
            bucket_size=c.bucket_size,
            n_buckets=c.n_buckets,
            causal=c.causal,
            seed=c.seed,
            dup_correction=c.dup_correction,
        )

    def core_flops(self, batch: int, seq_len: int) -> int:
        """Hashing matmul plus, per round, seq_len x 2 * bucket_size QK and PV dot products per head."""
        c = self.config
        if seq_len < c.bucket_size:  # shared-QK full attention fallback
            return 2 * 2 * batch * seq_len * seq_len * c.d_model
        n_buckets = c.n_buckets if c.n_buckets is not None else 2 * seq_len // c.bucket_size
        hashing = 2 * batch * seq_len * c.d_model * c.n_hashes * (n_buckets // 2)
        chunks = 2 * 2 * batch * c.n_hashes * seq_len * 2 * c.bucket_size * c.d_model
        return hashing + chunks
