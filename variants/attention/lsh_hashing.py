"""Angular-LSH hashing and sorting of LSH attention (`variants.attention.lsh`), and the buckets' replay.

As trax / HuggingFace `LSHSelfAttention` (see docs/lsh.md and the reference notes):

1. hash: bucket = argmax(concat([x R, -x R])) per round on the detached shared qk vectors, or with
   factorised buckets (a, b) argmax_a + a * argmax_b from two slices of R (the default for long
   sequences, as HF); round r's buckets are offset by r * n_buckets (`hash_buckets`, with the
   rotations R of `draw_rotations` and the bucket counts of `bucket_factors`);
2. sort all n_hashes * seq_len items together by (bucket, position) -- round 0 first (`sort_index`).

On CPU in float32 the fused C kernel (`lsh_cpu`, built on first use) does the hashing's argmax (and
`lsh_cpu.sort_items` the sort); without a C compiler the PyTorch ops here run (docs/lsh.md). On
CUDA with triton installed, `lsh_triton.hash_buckets` hashes instead.

A reversible layer recomputes its forward in the backward from a rebuilt input: `keep_buckets` and
`replayed_buckets` keep the first run's buckets and hand them back there (variants/replay.py), so
the recomputation attends over the same buckets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import variants.attention.lsh_cpu as lsh_cpu
import variants.replay as replay


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


def bucket_factors(n_buckets: int | Sequence[int] | None, seq_len: int, bucket_size: int) -> tuple[int, ...]:
    """Per-round bucket count as factors: (n,) for one argmax over n buckets, (a, b) for factorised hashing.

    n_buckets None -> 2 * seq_len // bucket_size buckets; above 2 * bucket_size of them they are
    factorised into two even factors a <= b (a closest to sqrt) as trax and HuggingFace do, so hashing
    costs (a + b) / 2 instead of n / 2 rotations per round and stays O(seq_len^1.5) rather than
    O(seq_len^2). For power-of-two lengths this is exactly HF's automatic choice (e.g. 16K tokens,
    bucket 64: 512 buckets as (16, 32)). Every factor must be even and at least 2.
    """
    if n_buckets is None:
        total = max(2, 2 * seq_len // bucket_size)
        total += total % 2
        if total > 2 * bucket_size:
            for small in range(math.isqrt(total), 1, -1):
                if total % small == 0 and small % 2 == 0 and (total // small) % 2 == 0:
                    return (small, total // small)
        return (total,)
    factors = (n_buckets,) if isinstance(n_buckets, int) else tuple(int(f) for f in n_buckets)
    if not factors or any(f < 2 or f % 2 for f in factors):
        raise ValueError(f"n_buckets must be even and at least 2 (or a list of such factors), got {n_buckets}")
    return factors


def per_head_rotations(rotations: torch.Tensor, heads: int, head_dim: int, n_hashes: int, factors: Sequence[int]) -> torch.Tensor:
    """rotations [heads, head_dim, n_hashes, sum(factors) // 2] or [head_dim, n_hashes, sum(factors) // 2]
    -> [heads, head_dim, n_hashes, sum(factors) // 2] (an expanded view for the latter); ValueError when
    the shape does not fit."""
    if rotations.dim() == 3:
        rotations = rotations.unsqueeze(0).expand(heads, -1, -1, -1)
    if rotations.dim() != 4 or rotations.shape[-2:] != (n_hashes, sum(factors) // 2) or rotations.shape[:2] != (heads, head_dim):
        raise ValueError(
            f"rotations of shape {tuple(rotations.shape)} do not fit heads={heads}, "
            f"head_dim={head_dim}, n_hashes={n_hashes}, n_buckets={tuple(factors)}"
        )
    return rotations


# Rotated values per slice of positions in `hash_buckets` (bounds its temporaries to ~100 MB).
HASH_SLICE_ELEMENTS = 2**23


def hash_buckets(
    qk: torch.Tensor, n_hashes: int, n_buckets: int | Sequence[int], rotations: torch.Tensor, *, cpu_kernel: bool = True
) -> torch.Tensor:
    """Angular-LSH buckets of qk [batch, heads, seq_len, head_dim] -> [batch, heads, n_hashes, seq_len].

    n_buckets: buckets per round, or factors (a, b, ...) whose product it is (factorised hashing:
    bucket = argmax_a + a * argmax_b + ..., each factor from its own slice of the rotations, as trax/HF).
    rotations: [heads, head_dim, n_hashes, sum(factors) // 2] or [head_dim, n_hashes, sum(factors) // 2].
    Round r's buckets lie in [r * n, (r + 1) * n), n = prod(factors). No gradient flows through hashing.
    cpu_kernel=False keeps float32 CPU tensors off the fused C kernel (backend 'ops').
    """
    factors = (n_buckets,) if isinstance(n_buckets, int) else tuple(n_buckets)
    rotations = per_head_rotations(rotations, qk.shape[1], qk.shape[3], n_hashes, factors)
    batch, heads, seq_len, _ = qk.shape
    offsets = torch.arange(n_hashes, device=qk.device) * math.prod(factors)
    if cpu_kernel and lsh_cpu.available(qk.device, qk.dtype) and qk.stride(-1) == 1:  # the fused CPU kernel
        return lsh_cpu.hash_buckets(qk.detach(), rotations, factors) + offsets[:, None]
    buckets = torch.zeros(batch, heads, n_hashes, seq_len, dtype=torch.long, device=qk.device)
    rotations = rotations.to(qk.dtype)
    # Positions in slices so the rotated vectors (and their temporaries) stay bounded: at 1M tokens
    # they would be several GB at once.
    step = max(1, HASH_SLICE_ELEMENTS // (batch * heads * n_hashes * rotations.shape[-1]))
    for first in range(0, seq_len, step):
        positions = slice(first, first + step)
        rotated = torch.einsum("bhld,hdnr->bhnlr", qk[:, :, positions].detach(), rotations)
        start, product = 0, 1
        for factor in factors:
            part = rotated[..., start : start + factor // 2]
            start += factor // 2
            # argmax over concat([part, -part]) without building it: ties go to the first half, as argmax does.
            high, low = part.max(dim=-1), part.min(dim=-1)
            bucket = torch.where(high.values >= -low.values, high.indices, low.indices + factor // 2)
            buckets[..., positions] += product * bucket
            product *= factor
    return buckets + offsets[:, None]


def sort_index(buckets: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The one sort of all rounds' items by (bucket, position): buckets [BH, n_hashes * seq_len] (round
    offsets included, item r * seq_len + position) -> [BH, n_hashes * seq_len] item id of each sorted index.

    bucket * seq_len + position is unique, so an unstable sort suffices. The sort keys are built in
    place of `buckets` (overwritten: callers drop it after the sort), so no third [BH, N] index
    tensor exists beside the keys and the result.
    """
    position = torch.arange(seq_len, device=buckets.device).repeat(buckets.shape[1] // seq_len)
    return buckets.mul_(seq_len).add_(position).argsort(dim=-1)


REPLAY_KIND = "lsh buckets"  # what `lsh_attention_packed` keeps in a reversible call's replay memo


def keep_buckets(buckets: torch.Tensor, n_buckets: int) -> None:
    """Keep `buckets` (each below `n_buckets`, all rounds' together) for the replay of this reversible
    layer call (variants/replay.py), in the narrowest integer type that holds them (int16 up to 2^15
    buckets: 1 MiB at 16K tokens, 8 rounds, 4 heads; no device sync to find out); outside a recorded
    call nothing."""
    if replay.recording_now():
        narrow = torch.int16 if n_buckets <= 2**15 else torch.int32
        replay.keep(REPLAY_KIND, (buckets.to(narrow, copy=True), buckets.dtype))  # a copy: the sort overwrites buckets


def replayed_buckets(shape: tuple[int, ...]) -> torch.Tensor | None:
    """The buckets [`shape`] this call's first run hashed, when this is its replay: the recomputation
    must attend over the same buckets, not over those of its rebuilt input (variants/replay.py). A
    fresh tensor each time (the sort overwrites it; a second backward replays again)."""
    kept = replay.recall(REPLAY_KIND)
    if kept is None:
        return None
    if tuple(kept[0].shape) != tuple(shape):
        raise RuntimeError(f"replayed LSH buckets of shape {tuple(kept[0].shape)}, this call hashes {tuple(shape)}: calls out of order")
    return kept[0].to(kept[1])
