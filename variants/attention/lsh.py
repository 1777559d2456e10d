"""LSH attention (Reformer): the `lsh_attention` functional core, `hash_buckets` and variant `lsh`.

Exactly the trax / HuggingFace `LSHSelfAttention` algorithm (see docs and the reference notes):

1. hash: bucket = argmax(concat([x R, -x R])) per round on the detached shared qk vectors, or with
   factorised buckets (a, b) argmax_a + a * argmax_b from two slices of R (the default for long
   sequences, as HF); round r's buckets are offset by r * n_buckets;
2. sort all n_hashes * seq_len items together by (bucket, position) -- round 0 first;
3. split that one sequence into chunks of bucket_size; each chunk attends to itself and to the
   chunk before it in the combined order, cyclically (the first chunk looks at the very last one,
   a round's first chunk at the previous round's last chunk);
4. keys are the length-normalised queries (`shared_qk_keys`); logits q . k with no other scaling;
   causal mask by original position (-1e9), then self penalty -1e5 (fp16: -1e4 / -1e3, as HF);
5. each round r gives o_r and the logsumexp z_r of its logits; unsort and combine
   out = sum_r softmax_r(z)_r * o_r.

How it runs (docs/performance.md has the measurements behind each choice): the `lsh` module
projects qk and v with one matmul into a packed [batch, seq_len, heads, 2 * head_dim] table (one
row per position and head: its qk, then its v), so no head split or merge is copied. Steps 3-5 are
one autograd Function, `_LSHCore`, that walks the sorted items in blocks of chunks small enough to
stay in cache on CPU: each block gathers its rows of the table into one reused buffer, reads each
chunk's window as a strided view (no look-back copies), and a hand-written backward gathers them
again and adds each block's gradients straight onto positions (index_add_). On CPU, where the
blocks are small, the only n_hashes * seq_len * head_dim buffer is the forward's sorted output
(freed once combined); the probabilities, n_hashes * seq_len * 2 * bucket_size per head, are the
largest saved tensor (none with save_probs=False, which recomputes them and the output in
backward); never seq_len^2. On CPU in float32 a fused C kernel (`lsh_cpu`, built on first use)
does the hashing and the sort, and (without dup_correction) the chunked part and its backward, with
the same results (without save_probs the backward's dY . Y pass stays on the ops path); without a C
compiler the PyTorch ops above run (docs/lsh.md). On CUDA with triton installed, Triton kernels
(`lsh_triton`) run the hashing, steps 3-5 and their backward instead. `backend=` ('auto', 'ops',
'cpu_kernel', 'triton'; `lsh_backends`) picks one explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.profiler import record_function

import variants.attention.lsh_cpu as lsh_cpu
import variants.attention.lsh_triton as lsh_triton
import variants.replay as replay
from variants.attention.base import AttentionConfig, AttentionModule
from variants.attention.full import full_attention, full_attention_bytes, mask_values, shared_qk_key_scale, shared_qk_keys_backward
from variants.attention.lsh_backends import check_backend_name, resolve_backend
from variants.registry import register, register_backend
from variants.traffic import INDEX_BYTES, Traffic, linear, matmul, pointwise, softmax


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


def _duplicate_counts(chunk_of: torch.Tensor, query_rows: torch.Tensor, key_rows: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """N_ij for every logit of a block: how often key position j occurs in the windows of query position i.

    chunk_of: [rows, n_hashes] chunk (in the combined order) of each (head, position)'s item per
    round; query_rows: [G, c] and key_rows: [G, 2c] rows of chunk_of of a block's queries and window
    keys. Returns [G, c, 2c]. Query i's window in round r is chunks {k, k - 1} with
    k = chunk_of[i, r]; key j occurs there as its round-r item (chunk k or k - 1) or, when k - 1 belongs
    to round r - 1, as its round-(r-1) item.
    """
    n_hashes = chunk_of.shape[1]
    c_query = chunk_of[query_rows].unsqueeze(-2)  # [G, c, 1, n_hashes]
    c_key = chunk_of[key_rows].unsqueeze(-3)  # [G, 1, 2c, n_hashes]
    before = (c_query - 1) % n_chunks
    counts = (c_key == c_query).sum(-1) + (c_key == before).sum(-1)
    if n_hashes > 1:  # key j's previous-round item in the chunk before a round's first chunk
        counts = counts + (c_key.roll(1, dims=-1) == before).sum(-1)
    return counts


register_backend("lsh_cpu_kernel", lsh_cpu.status)  # which path LSH attention takes on CPU, in run records
register_backend("lsh_triton", lsh_triton.status)  # and whether the Triton kernels can run on CUDA

# Logit elements per block of chunks: on CPU a block's rows, logits and probabilities stay in cache
# (64 chunks of 64 x 128 measured fastest here, docs/performance.md); on CUDA one block usually
# covers everything.
CPU_BLOCK_ELEMENTS = 2**19
CUDA_BLOCK_ELEMENTS = 2**28

Block = tuple[slice, int, int]  # (heads, first chunk, number of chunks)


@dataclass
class SortedItems:
    """The hashed and sorted items of `lsh_attention`, and how `_LSHCore` walks them in blocks.

    rows: [BH, c + N] row ((b * L + position) * H + h) of each item in the [B * L * H, 2d] (qk | v)
    table and the [B * L * H, d] output, in sorted order, with the last chunk prepended, so the window of
    chunk g (chunk g - 1 cyclically, then chunk g) is entries g*c .. g*c + 2c; within a head rows
    grow with the position, so they serve as positions in the masks; undo: [BH, N] sorted index of
    item r * seq_len + position; sort_idx: its inverse; N = n_hashes * seq_len. Round r's items are exactly sorted indices r*L .. (r+1)*L
    (bucket offsets), so a chunk never mixes rounds and only a round's first chunk can see a
    position twice (its own item and another round's item in the chunk before).
    """

    rows: torch.Tensor
    undo: torch.Tensor
    sort_idx: torch.Tensor
    heads: int
    seq_len: int
    n_hashes: int
    chunk: int
    causal: bool
    save_probs: bool
    chunk_of: torch.Tensor | None  # [B * seq_len * H, n_hashes] (by rows) for dup_correction
    block_elements: int
    cpu_kernel: bool = True  # False: float32 CPU tensors stay on the ops path (backend 'ops')

    @property
    def n_chunks(self) -> int:
        return self.undo.shape[1] // self.chunk

    def blocks(self) -> list[Block]:
        """All heads at once when the logits fit `block_elements`, else runs of chunks of one head."""
        heads = self.rows.shape[0]
        per_chunk = self.chunk * 2 * self.chunk
        if heads * self.n_chunks * per_chunk <= self.block_elements:
            return [(slice(0, heads), 0, self.n_chunks)]
        step = max(1, self.block_elements // per_chunk)
        return [(slice(h, h + 1), first, min(step, self.n_chunks - first)) for h in range(heads) for first in range(0, self.n_chunks, step)]

    def span(self, x: torch.Tensor, block: Block) -> torch.Tensor:
        """x [BH, c + N, ...] (padded sorted order) -> [h, (count + 1) * c, ...]: the block's windows' rows."""
        heads, first, count = block
        return x[heads, first * self.chunk : (first + count + 1) * self.chunk]

    def sorted_slice(self, x: torch.Tensor, block: Block) -> torch.Tensor:
        """x [BH, N, ...] in sorted order -> the block's [h * count, c, ...] (a view for one head)."""
        heads, first, count = block
        return x[heads, first * self.chunk : (first + count) * self.chunk].reshape(-1, self.chunk, *x.shape[2:])

    def round_first(self, block: Block) -> list[int]:
        """Indices (into the block's h * count chunks) of the chunks whose window can hold a position twice.

        Those open a hash round: the chunk before belongs to the previous round (or, with a single
        chunk in all, is the chunk itself).
        """
        if self.n_hashes == 1 and self.n_chunks > 1:
            return []
        heads, first, count = block
        per_round = self.n_chunks // self.n_hashes
        starts = range(-(-first // per_round) * per_round, first + count, per_round)
        return [h * count + g - first for h in range(heads.stop - heads.start) for g in starts]


def _windows(span: torch.Tensor, chunk: int) -> torch.Tensor:
    """span [h, (count + 1) * chunk, ...] -> windows [h * count, 2 * chunk, ...] (chunk before, chunk).

    Overlapping strided view with no copy for one head; a copy for several.
    """
    h, n = span.shape[:2]
    count = n // chunk - 1
    size = (h, count, 2 * chunk) + tuple(span.shape[2:])
    stride = (span.stride(0), chunk * span.stride(1)) + tuple(span.stride()[1:])
    windows = span.as_strided(size, stride, span.storage_offset())
    return windows[0] if h == 1 else windows.reshape(-1, *size[2:])


def _chunks(span: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """span [h, (count + 1) * chunk, d] -> (chunks before [h * count, c, d], own chunks [h * count, c, d]) views."""
    h, n, d = span.shape
    as_chunks = span.view(h, n // chunk, chunk, d)
    return as_chunks[:, :-1].reshape(-1, chunk, d), as_chunks[:, 1:].reshape(-1, chunk, d)


def _fill_constant(items: SortedItems, block: Block, x: torch.Tensor, self_value: float, later_value: float) -> None:
    """Set the logits of a block that are constants, in place: x [h * count, c, 2c].

    self (key position == query position) -> self_value; causal: later key -> later_value (first,
    so that the self logit ends as self_value). Without causal masking the self logits are the
    own-chunk diagonal plus, in a round's first chunk, repeats in the chunk before: no full compare.
    """
    c = items.chunk
    span = items.span(items.rows, block)
    if items.causal or items.chunk_of is not None:
        query_rows = span[:, c:].reshape(-1, c, 1)
        key_rows = _windows(span, c).unsqueeze(1)
        if items.causal:
            x.masked_fill_(query_rows < key_rows, later_value)
        x.masked_fill_(query_rows == key_rows, self_value)
        return
    x[:, :, c:].diagonal(dim1=1, dim2=2).fill_(self_value)
    firsts = items.round_first(block)
    if firsts:
        index = torch.tensor(firsts, device=x.device)
        before, own = _chunks(span.unsqueeze(-1), c)
        repeats = own[index] == before[index].transpose(1, 2)  # [k, c, c]
        x[index, :, :c] = x[index, :, :c].masked_fill(repeats, self_value)


def _masked_logits(
    items: SortedItems, block: Block, query: torch.Tensor, keys: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of a block [h * count, c, 2c]: q . k, causal then self masks, minus log N_ij (dup_correction).

    query [h * count, c, d], keys (windows) [h * count, 2c, d]; written into `out` when given.
    """
    logits = torch.bmm(query, keys.transpose(1, 2), out=out)
    mask_value, self_value = mask_values(logits.dtype)
    _fill_constant(items, block, logits, self_value, mask_value)
    if items.chunk_of is not None:
        c = items.chunk
        span = items.span(items.rows, block)
        counts = _duplicate_counts(items.chunk_of, span[:, c:].reshape(-1, c), _windows(span, c), items.n_chunks)
        logits.sub_(counts.to(logits.dtype).log_())
    return logits


class _BlockRows:
    """One block's rows of the [B * L * H, 2d] (qk | v) table, gathered into a buffer reused by every block.

    key_scale: [B * L * H, 1] per-position key scales (`shared_qk_key_scale`), so a block's keys
    cost one multiply. gather(block) -> (rows, qk, keys, v, scale): the span's table rows
    [h, (count + 1) * c], its qk, keys and v [h, (count + 1) * c, d] and key scales [..., 1]. A
    block's rows stay in cache while its matmuls read them; the buffer is as large as the largest
    block (bounded by block_elements: all heads and chunks at once only when they fit).
    """

    def __init__(self, items: SortedItems, table: torch.Tensor, key_scale: torch.Tensor):
        self.items, self.table, self.key_scale = items, table, key_scale
        heads, first, count = max(items.blocks(), key=lambda b: (b[0].stop - b[0].start) * b[2])
        self.buffer = table.new_empty((heads.stop - heads.start) * (count + 1) * items.chunk, table.shape[1])

    def gather(self, block: Block) -> tuple[torch.Tensor, ...]:
        rows = self.items.span(self.items.rows, block)
        flat = rows.reshape(-1)
        both = torch.index_select(self.table, 0, flat, out=self.buffer[: flat.numel()]).view(*rows.shape, -1)
        d = both.shape[-1] // 2
        qk, v = both[..., :d], both[..., d:]
        scale = self.key_scale.index_select(0, flat).view(*rows.shape, 1)
        return rows, qk, qk * scale, v, scale


def _fold_windows(windows: torch.Tensor, chunk: int, out: torch.Tensor) -> torch.Tensor:
    """Window rows [h * count, 2c, d] summed onto the span rows they came from: out [h, (count + 1) * c, d].

    Window g is chunks g and g + 1 of the span (`_windows`: the chunk before, then its own), so
    span chunk g gets the first half of window g and the second half of window g - 1.
    """
    h = out.shape[0]
    spans = out.view(h, -1, chunk, out.shape[-1])
    halves = windows.view(h, -1, 2, chunk, windows.shape[-1])
    spans[:, 1:].copy_(halves[:, :, 1])
    spans[:, 0].zero_()
    spans[:, :-1] += halves[:, :, 0]
    return out


def _unsort(sorted_rows: torch.Tensor, items: SortedItems) -> torch.Tensor:
    """Sum over rounds of sorted-order rows back onto positions: [BH, N, d] -> [B * L * H, d].

    Row (b * L + position) * H + h of the result is the sum over rounds r of
    sorted_rows[b * H + h, undo[b * H + h, r * L + position]]. A gather per round (no scatter):
    round r's items are a permutation of the positions.
    """
    bh, width, d = sorted_rows.shape
    heads, seq_len, n_hashes = items.heads, items.seq_len, items.n_hashes
    start = torch.arange(bh, device=sorted_rows.device).view(bh // heads, heads, 1, 1) * width
    index = (items.undo.view(bh // heads, heads, n_hashes, seq_len) + start).permute(2, 0, 3, 1)  # [rounds, B, L, H]
    flat = sorted_rows.view(-1, d)
    total = flat.index_select(0, index[0].reshape(-1))
    for r in range(1, n_hashes):
        total += flat.index_select(0, index[r].reshape(-1))
    return total


def _exp_logits(items: SortedItems, block: Block, query: torch.Tensor, keys: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """The block's unnormalised probabilities exp(logits - row max) [h * count, c, 2c] again, from the saved row max [BH, N, 1]."""
    return _masked_logits(items, block, query, keys).sub_(items.sorted_slice(row_max, block)).exp_()


def _recomputed_grad_dot_out(
    items: SortedItems, gather: _BlockRows, row_max: torch.Tensor, scale: torch.Tensor, grad_combined: torch.Tensor
) -> torch.Tensor:
    """dY . Y per row [B * L * H, 1] without the output Y: sum over items of w_t (dY . o_t), o_t recomputed block by block."""
    c = items.chunk
    grad_dot_out = grad_combined.new_zeros(grad_combined.shape[0], 1)
    for block in items.blocks():
        rows, qk, keys, v, _ = gather.gather(block)
        d = qk.shape[-1]
        e = _exp_logits(items, block, qk[:, c:].reshape(-1, c, d), _windows(keys, c), row_max)
        query_rows = rows[:, c:].reshape(-1)
        d_out = grad_combined.index_select(0, query_rows).view(-1, c, d)
        dots = (d_out * torch.bmm(e, _windows(v, c))).sum(-1, keepdim=True).mul_(items.sorted_slice(scale, block))
        grad_dot_out.index_add_(0, query_rows, dots.view(-1, 1))
    return grad_dot_out


def mask_arguments(dtype: torch.dtype) -> dict[str, float]:
    """`mask_value` (a later key under causal) and `self_value` (a query's own key) for `dtype`, as the
    keyword arguments of `lsh_cpu.forward` / `backward`."""
    mask_value, self_value = mask_values(dtype)
    return dict(mask_value=mask_value, self_value=self_value)


def fused_forward_combining(
    table: torch.Tensor,
    key_scale: torch.Tensor,
    items: SortedItems,
    probs: torch.Tensor | None,
    row_max: torch.Tensor,
    row_sum: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's forward with the rounds combined per position inside it.

    Fills probs (when kept), row_max and row_sum [BH, N, 1]; returns the combined output
    [B * L * H, d] and each item's scale w_t / row sum [BH, N, 1] for the backward, with
    w_t = exp(z_t - M) / S from the position's largest logsumexp M and S = sum_r exp(z_r - M) (the
    same normalisation by the sum as the ops path).
    """
    rows, d = table.shape[0], table.shape[1] // 2
    combined = table.new_zeros(rows, d)
    lse_max, lse_sum = table.new_full((rows,), -math.inf), table.new_zeros(rows)
    scale = torch.empty_like(row_max)
    lsh_cpu.forward(
        table,
        key_scale,
        items.rows,
        chunk=items.chunk,
        causal=items.causal,
        **mask_arguments(table.dtype),
        probs=probs,
        row_max=row_max,
        row_sum=row_sum,
        out=None,
        combined=combined,
        lse_max=lse_max,
        lse_sum=lse_sum,
        item_scale=scale,
        seq_len=items.seq_len,
    )
    return combined, scale


class _LSHCore(torch.autograd.Function):
    """Chunked attention of the sorted items over their windows, combined over rounds.

    forward(table [B * L * H, 2d] of (qk | v) rows, items) -> [B * L * H, d], rows (b * L + position) * H + h.
    Block by block: gather the block's rows (qk and v together, keys normalised from them), logits,
    softmax and P @ V of each chunk over its window (a strided view: no look-back copies), into
    sorted order; then the rounds are combined with weights softmax_r(lse_r) by one gather per
    round. The probabilities are kept unnormalised, exp(logit - row max), with scale = w_t / row
    sum per item, which both the output and the backward fold into [c, d] rows instead of a pass
    over the [c, 2c] probabilities. save_probs keeps them (and the output) for the backward; without,
    the backward recomputes them, and dY . Y, from the saved row max, so nothing of size
    n_hashes * seq_len * head_dim (or * bucket_size) is kept. The backward is written by hand: with Y = sum_r w_r o_r,
    dO_t = w_t dY and the softmax/logsumexp terms reduce to dS = P * (dP - w_t (dY . Y)). Each block
    folds its window gradients onto its span, maps the key gradients back through the key
    normalisation there, and adds its (dqk | dv) rows onto positions with one index_add_ (on CUDA
    its atomics make the sums' order, so the last bits, vary between runs). On CPU in float32
    without dup_correction the fused kernel (`lsh_cpu.forward` / `backward`) replaces the block
    loops: the same quantities chunk by chunk, with the rounds combined per position inside the
    forward when there are at least as many heads as kernel threads (`fused_forward_combining`).
    """

    @staticmethod
    def forward(ctx, table, items: SortedItems):
        c, n_hashes = items.chunk, items.n_hashes
        bh, n_items = items.undo.shape
        d = table.shape[-1] // 2
        new = dict(dtype=table.dtype, device=table.device)
        key_scale = shared_qk_key_scale(table[:, :d]).to(table.dtype)  # autocast computes it in fp32
        row_max = torch.empty(bh, n_items, 1, **new)
        row_sum = torch.empty_like(row_max)
        ctx.fused = items.cpu_kernel and lsh_cpu.usable(table) and items.chunk_of is None
        # On AVX-512 the fused kernel's backward recomputes the probabilities (faster than keeping
        # them, `lsh_cpu.keep_probs`); save_probs still keeps the output there (for dY . Y).
        keep = items.save_probs and (not ctx.fused or lsh_cpu.keep_probs())
        probs = torch.empty(bh, n_items, 2 * c, **new) if keep else None
        if ctx.fused and bh >= lsh_cpu.threads():
            # The kernel combines the rounds per position as it goes (no [BH, N, d] output buffer);
            # M and S (largest logsumexp, sum of exp(z - M)) give each item's weight exp(z - M) / S.
            combined, scale = fused_forward_combining(table, key_scale, items, probs, row_max, row_sum)
        else:
            out = torch.empty(bh, n_items, d, **new)
            if ctx.fused:
                lsh_cpu.forward(
                    table,
                    key_scale,
                    items.rows,
                    chunk=c,
                    causal=items.causal,
                    **mask_arguments(table.dtype),
                    probs=probs,
                    row_max=row_max,
                    row_sum=row_sum,
                    out=out,
                )
            else:
                gather = _BlockRows(items, table, key_scale)
                for block in items.blocks():
                    _, qk, keys, v, _ = gather.gather(block)
                    target = items.sorted_slice(probs, block) if probs is not None else None
                    logits = _masked_logits(items, block, qk[:, c:].reshape(-1, c, d), _windows(keys, c), out=target)
                    top = torch.amax(logits, dim=-1, keepdim=True, out=items.sorted_slice(row_max, block))
                    torch.sum(logits.sub_(top).exp_(), dim=-1, keepdim=True, out=items.sorted_slice(row_sum, block))
                    torch.bmm(logits, _windows(v, c), out=items.sorted_slice(out, block))
            scale = row_sum.reciprocal()
            if n_hashes > 1:
                lse = (row_max + row_sum.log()).view(bh, n_items)
                per_round = lse.gather(1, items.undo).view(bh, n_hashes, -1)
                # Normalised by the sum rather than exp(lse - logsumexp): exact for rows whose max is ~ -1e5
                # (only the self logit allowed), where fp32 cannot hold -1e5 + log(2) to 4e-3.
                per_round = torch.exp(per_round - per_round.amax(dim=1, keepdim=True))
                per_round /= per_round.sum(dim=1, keepdim=True)
                scale.mul_(per_round.view(bh, n_items).gather(1, items.sort_idx).unsqueeze(-1))  # w_t in sorted order
            if ctx.fused:
                combined = lsh_cpu.combine(out, scale, items.undo, batch=bh // items.heads, heads=items.heads, seq_len=items.seq_len)
            else:
                combined = _unsort(out.mul_(scale), items)
            del out
        del row_sum
        ctx.items = items
        # Without save_probs the output is not kept either: backward recomputes dY . Y (one more pass).
        ctx.save_for_backward(table, key_scale, combined if items.save_probs else None, row_max, scale, probs)
        return combined

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable: no double backward
    def backward(ctx, grad_combined):
        with record_function("lsh/attend_backward"):
            return _LSHCore._backward(ctx, grad_combined)

    @staticmethod
    def _backward(ctx, grad_combined):
        table, key_scale, combined, row_max, scale, probs = ctx.saved_tensors
        items: SortedItems = ctx.items
        c, d = items.chunk, table.shape[-1] // 2
        grad_combined = grad_combined.contiguous()
        gather = None if ctx.fused and combined is not None else _BlockRows(items, table, key_scale)
        if combined is not None:
            grad_dot_out = (grad_combined * combined).sum(-1, keepdim=True)  # dY . Y per row
        else:
            grad_dot_out = _recomputed_grad_dot_out(items, gather, row_max, scale, grad_combined)
        grad_table = torch.zeros_like(table)
        if ctx.fused:
            lsh_cpu.backward(
                table,
                key_scale,
                items.rows,
                chunk=c,
                causal=items.causal,
                **mask_arguments(table.dtype),
                probs=probs,
                row_max=row_max,
                scale=scale,
                grad_out=grad_combined,
                grad_dot=grad_dot_out,
                grad_table=grad_table,
            )
            return grad_table, None
        span_grad = torch.empty_like(gather.buffer)
        for block in items.blocks():
            rows, qk, keys, v, span_scale = gather.gather(block)
            query = qk[:, c:].reshape(-1, c, d)
            # dO_t = w_t dY and w_t (dY . Y), both over the row sum since P = E / row sum
            query_rows, item_scale = rows[:, c:].reshape(-1), items.sorted_slice(scale, block)
            d_out = grad_combined.index_select(0, query_rows).view(-1, c, d).mul_(item_scale)
            shift = grad_dot_out.index_select(0, query_rows).view(-1, c, 1).mul_(item_scale)
            e = items.sorted_slice(probs, block) if probs is not None else _exp_logits(items, block, query, _windows(keys, c), row_max)
            grad_values = torch.bmm(e.transpose(1, 2), d_out)
            d_logits = torch.bmm(d_out, _windows(v, c).transpose(1, 2)).sub_(shift).mul_(e)
            _fill_constant(items, block, d_logits, 0.0, 0.0)  # constant (masked, self) logits pass no gradient
            grad_query = torch.bmm(d_logits, _windows(keys, c))
            grad_keys = _fold_windows(torch.bmm(d_logits.transpose(1, 2), query), c, torch.empty_like(keys))
            both = span_grad[: rows.numel()].view(*rows.shape, 2 * d)
            shared_qk_keys_backward(qk, grad_keys, span_scale, out=both[..., :d])
            both[:, c:, :d] += grad_query.view(rows.shape[0], -1, d)
            _fold_windows(grad_values, c, both[..., d:])
            grad_table.index_add_(0, rows.reshape(-1), both.view(-1, 2 * d))
        return grad_table, None


def lsh_attention(
    qk: torch.Tensor,
    v: torch.Tensor,
    *,
    n_hashes: int,
    bucket_size: int,
    n_buckets: int | Sequence[int] | None = None,
    causal: bool = False,
    rotations: torch.Tensor | None = None,
    seed: int | None = None,
    dup_correction: bool = False,
    save_probs: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Shared-QK LSH attention on qk, v [batch, heads, seq_len, head_dim] -> [batch, heads, seq_len, head_dim].

    n_buckets: buckets per round or its factors (see `bucket_factors`; None -> 2 * seq_len // bucket_size,
    factorised above 2 * bucket_size, or what the rotations hold). rotations: [heads, head_dim, n_hashes,
    sum(factors) // 2] or [head_dim, n_hashes, sum(factors) // 2]; when None they are drawn by
    `draw_rotations` from `seed` or, without one, from the global RNG. seq_len must be a multiple of
    bucket_size; shorter sequences fall back to shared-QK full attention (HF does so for
    seq_len <= bucket_size; at seq_len == bucket_size the LSH path sees every key twice per window,
    which gives the same result).

    dup_correction (paper eq. 16, off in later trax and HF) subtracts log N_ij from each logit, where
    N_ij counts the occurrences of key position j in query position i's windows over all rounds
    (window = i's chunk and the chunk before it, cyclic, in the combined order; a key present in both
    chunks of one window counts twice). Then the output is exactly softmax attention over the union
    of i's candidates. Unlike Jan-2020 trax, N_ij >= 1 for every key in a window, so no logit ever
    gains +log(1e9).

    save_probs keeps the [heads, n_hashes * seq_len, 2 * bucket_size] probabilities and the output
    for the backward (fastest); False keeps neither and recomputes them there from the saved row
    max (two more q.k and one more P @ V matmul per block; nothing of size n_hashes * seq_len * d
    or n_hashes * seq_len * bucket_size is kept: what a 1M-token step wants).

    backend: which code runs the core, 'auto', 'ops', 'cpu_kernel' or 'triton' (variants/attention/
    lsh_backends.py; the Triton kernels ignore save_probs: they keep neither probabilities nor
    per-round outputs).

    The work is done by `lsh_attention_packed`, on qk and v packed side by side per head (a copy
    here; the `lsh` module projects straight into that layout).
    """
    if qk.shape != v.shape:
        raise ValueError(f"qk and v must have the same shape, got {tuple(qk.shape)} and {tuple(v.shape)}")
    packed = torch.cat([qk.transpose(1, 2), v.transpose(1, 2)], dim=-1)
    out = lsh_attention_packed(
        packed,
        n_hashes=n_hashes,
        bucket_size=bucket_size,
        n_buckets=n_buckets,
        causal=causal,
        rotations=rotations,
        seed=seed,
        dup_correction=dup_correction,
        save_probs=save_probs,
        backend=backend,
    )
    return out.transpose(1, 2)


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


def lsh_attention_packed(
    packed: torch.Tensor,
    *,
    n_hashes: int,
    bucket_size: int,
    n_buckets: int | Sequence[int] | None = None,
    causal: bool = False,
    rotations: torch.Tensor | None = None,
    seed: int | None = None,
    dup_correction: bool = False,
    save_probs: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """`lsh_attention` on packed [batch, seq_len, heads, 2 * head_dim] (qk | v per head) -> [batch, seq_len, heads, head_dim].

    The layout of one projection whose weight rows are ordered (head, qk/v, dim): each position
    and head is one row of a [batch * seq_len * heads, 2 * head_dim] table, which the core gathers
    (qk and v in one read) and writes the gradient of in place of any split, merge or copy.
    Arguments as `lsh_attention`.
    """
    batch, seq_len, heads, width = packed.shape
    if width % 2:
        raise ValueError(f"packed qk | v must have an even last dimension, got {width}")
    head_dim = width // 2
    check_backend_name(backend)
    if n_hashes < 1 or bucket_size < 1:
        raise ValueError(f"n_hashes and bucket_size must be positive, got {n_hashes}, {bucket_size}")
    if rotations is not None and rotations.shape[-2] != n_hashes:
        raise ValueError(f"rotations have {rotations.shape[-2]} rounds, n_hashes={n_hashes}")
    qk = packed[..., :head_dim].transpose(1, 2)  # [batch, heads, seq_len, head_dim] views
    if seq_len < bucket_size:
        out = full_attention(qk, qk, packed[..., head_dim:].transpose(1, 2), causal=causal, shared_qk=True)
        return out.transpose(1, 2)
    if seq_len % bucket_size:
        raise ValueError(f"seq_len={seq_len} is not a multiple of bucket_size={bucket_size}")
    if n_buckets is None and rotations is not None:
        n_buckets = 2 * rotations.shape[-1]
    factors = bucket_factors(n_buckets, seq_len, bucket_size)
    if rotations is None:
        rotations = draw_rotations(heads, head_dim, n_hashes, sum(factors), seed=seed, device=packed.device, dtype=packed.dtype)

    bh, c = batch * heads, bucket_size
    n_items = n_hashes * seq_len
    device = packed.device
    used = resolve_backend(backend, device, packed.dtype, head_dim=head_dim, bucket_size=c, dup_correction=dup_correction)
    kernel = used.startswith("cpu_kernel")
    with torch.no_grad(), record_function("lsh/hash"):
        buckets = replayed_buckets((bh, n_items))  # in a reversible backward's recomputation: the forward's
        if buckets is None and used == "triton" and len(factors) <= 2:  # the rotation matmul and the argmax in one kernel
            rotations = per_head_rotations(rotations, heads, head_dim, n_hashes, factors)
            buckets = lsh_triton.hash_buckets(packed.reshape(-1, width), rotations, factors, seq_len=seq_len, chunk=c)
        elif buckets is None:
            buckets = hash_buckets(qk, n_hashes, factors, rotations, cpu_kernel=kernel).view(bh, n_items)
        keep_buckets(buckets, n_hashes * math.prod(factors))
    if used == "triton":
        with torch.no_grad(), record_function("lsh/sort"):
            sort_idx = sort_index(buckets, seq_len)
        del buckets
        with record_function("lsh/attend"), torch.autocast(device.type, enabled=False):
            out = lsh_triton.attend(packed.reshape(-1, width), sort_idx, seq_len=seq_len, heads=heads, chunk=c, causal=causal)
        return out.view(batch, seq_len, heads, head_dim)
    with torch.no_grad(), record_function("lsh/sort"):
        # One sort for all rounds, by (bucket, position): a stable sort of the buckets.
        if kernel:  # one counting sort per head in the CPU kernel
            n_round = math.prod(factors)
            sort_idx, undo, rows = lsh_cpu.sort_items(buckets, n_buckets=n_hashes * n_round, heads=heads, seq_len=seq_len, chunk=c)
        else:
            sort_idx = sort_index(buckets, seq_len)
            head = torch.arange(bh, device=device).unsqueeze(1)
            rows = ((head // heads) * seq_len + sort_idx % seq_len) * heads + head % heads
            rows = torch.cat([rows[:, -c:], rows], dim=1)  # last chunk first: the cyclic look-back
            undo = torch.empty_like(sort_idx)
            undo.scatter_(1, sort_idx, torch.arange(n_items, device=device).expand_as(sort_idx))
        del buckets
        chunk_of = None
        if dup_correction:
            chunk_of = (undo // c).view(batch, heads, n_hashes, seq_len).permute(0, 3, 1, 2).reshape(-1, n_hashes)
    items = SortedItems(
        rows=rows,
        undo=undo,
        sort_idx=sort_idx,
        heads=heads,
        seq_len=seq_len,
        n_hashes=n_hashes,
        chunk=c,
        causal=causal,
        save_probs=save_probs,
        chunk_of=chunk_of,
        block_elements=CUDA_BLOCK_ELEMENTS if device.type == "cuda" else CPU_BLOCK_ELEMENTS,
        cpu_kernel=kernel,
    )
    del rows
    # The core computes in the table's dtype (under autocast too: its out= matmuls and saved
    # buffers are of that dtype).
    with record_function("lsh/attend"), torch.autocast(device.type, enabled=False):
        out = _LSHCore.apply(packed.reshape(-1, width), items)
    return out.view(batch, seq_len, heads, head_dim)


@dataclass
class LSHAttentionConfig(AttentionConfig):
    """AttentionConfig plus LSH parameters (always shared-QK).

    n_hashes: hashing rounds; bucket_size: chunk length; n_buckets: buckets per round (even), or its
    even factors for factorised hashing (in a suite `n_buckets: [16, 32]` is one factor pair; sweep
    with a list of them, [[16, 32], [512]]);
    None -> 2 * seq_len // bucket_size at forward time, factorised above 2 * bucket_size (as HF);
    seed: fixed rotations (None -> fresh ones drawn from the global RNG every forward);
    dup_correction: subtract log N_ij (paper eq. 16); save_probs: keep the attention probabilities
    for the backward (False recomputes them and the output in backward: least memory, more matmuls);
    backend: 'auto', 'ops', 'cpu_kernel' or 'triton' (variants/attention/lsh_backends.py).
    """

    n_hashes: int = 1
    bucket_size: int = 64
    n_buckets: int | tuple[int, ...] | None = None
    seed: int | None = None
    dup_correction: bool = False
    save_probs: bool = True
    backend: str = "auto"

    def validate(self) -> None:
        """Raise ValueError when the fields are inconsistent."""
        super().validate()
        check_backend_name(self.backend)
        if self.n_hashes < 1:
            raise ValueError(f"n_hashes must be positive, got {self.n_hashes}")
        if self.bucket_size < 1:
            raise ValueError(f"bucket_size must be positive, got {self.bucket_size}")
        if self.n_buckets is not None:
            bucket_factors(self.n_buckets, self.bucket_size, self.bucket_size)

    def check_seq_len(self, seq_len: int) -> None:
        """Shorter than bucket_size: full attention (any length); otherwise a multiple of bucket_size."""
        if seq_len >= self.bucket_size and seq_len % self.bucket_size:
            raise ValueError(f"seq_len={seq_len} is not a multiple of bucket_size={self.bucket_size}")


FUSED_BACKENDS = ("cpu_kernel", "triton")  # backends whose chunked core keeps its tiles on chip


def lsh_attention_bytes(
    batches: int,
    seq_len: int,
    head_dim: int,
    element_size: int,
    *,
    n_hashes: int,
    bucket_size: int,
    rotations: int,
    causal: bool = False,
    fused: bool = False,
    save_probs: bool = True,
) -> Traffic:
    """Bytes of the LSH core on [batches, seq_len, head_dim] shared-QK and value operands
    (batches = batch x heads; variants/traffic.py), with `rotations` columns of the hashing
    matmul per round. Hashing (no backward): reads qk, writes and re-reads the rotated vectors
    for the argmax, writes int64 buckets; the sort reads the keys, writes sorted keys and the
    permutation, and inverts it (5 int64 passes over the n_hashes x seq_len items). The chunked
    part per item (a query of one round; N items in all): `fused` (the C and Triton kernels) reads
    its chunk's and the previous chunk's qk and v rows through the index and writes its output row
    and logsumexp (and, with `save_probs`, its 2 x bucket_size probabilities); backward reads them
    again with the output gradient and adds gradients onto one query row and two key and two
    value rows (each read and written). Not fused (the PyTorch ops): the rows gathered into a
    buffer, then op by op the keys' normalisation, the [bucket_size, 2 bucket_size] logits, their
    masks, logsumexp and softmax, and PV. The rounds are then combined: each round's output and
    logsumexp read, one output written."""
    items = batches * n_hashes * seq_len
    rows = batches * seq_len * head_dim
    window = 2 * bucket_size
    hashing = Traffic((rows + 2 * batches * seq_len * n_hashes * rotations) * element_size + items * INDEX_BYTES, 0)
    sort = Traffic(5 * items * INDEX_BYTES, 0)
    combine = Traffic(
        (items * head_dim + rows) * element_size + items * 4,
        (rows + 2 * items * head_dim) * element_size + 2 * items * 4,
    )
    if fused:
        probs = window * element_size if save_probs else 0
        forward = items * ((4 * head_dim + head_dim + probs) * element_size + 2 * INDEX_BYTES + 4)
        backward = items * ((head_dim + 4 * head_dim + probs + 10 * head_dim) * element_size + 2 * INDEX_BYTES + 4)
        return hashing + sort + combine + Traffic(forward, backward)
    chunks = items // bucket_size
    scores = items * window
    gather = Traffic(items * (4 * head_dim * element_size + INDEX_BYTES), items * (4 * head_dim * element_size + INDEX_BYTES))
    keys = pointwise(items * head_dim, element_size, saved=1)
    logits = matmul(chunks, bucket_size, head_dim, window, element_size)
    masks = pointwise(scores, element_size).times(1 + int(causal))
    logsumexp = Traffic(scores * element_size + items * 4, (scores + items) * element_size + scores * element_size)
    values = matmul(chunks, bucket_size, window, head_dim, element_size)
    return hashing + sort + combine + gather + keys + logits + masks + logsumexp + softmax(scores, element_size) + values


@register("lsh", config=LSHAttentionConfig)
class LSHAttention(AttentionModule):
    """Reformer LSH attention (shared QK, hashed and chunked; trax / HuggingFace semantics)."""

    def __init__(self, config: LSHAttentionConfig):
        super().__init__(config, n_inputs=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq_len, d_model] -> [batch, seq_len, d_model].

        One projection with in_proj's weight rows reordered (head, qk/v, dim) gives the packed
        [batch, seq_len, heads, 2 * head_dim] table the LSH core reads and writes its gradient
        into: no head split or merge is copied. Same parameters and FLOPs as `split_heads`.
        """
        batch, seq_len, d_model = x.shape
        c = self.config
        if seq_len < c.bucket_size:
            return super().forward(x)
        weight = self.in_proj.weight.view(2, c.n_heads, c.head_dim, d_model).transpose(0, 1).reshape(2 * d_model, d_model)
        packed = F.linear(x, weight).view(batch, seq_len, c.n_heads, 2 * c.head_dim)
        self._record_backend(packed)
        out = lsh_attention_packed(packed, **self._lsh_arguments())
        return self.dropout(self.out_proj(out.reshape(batch, seq_len, d_model)))

    def attend(self, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """qk, v: [batch, heads, seq_len, head_dim] -> same shape; rotations drawn per call."""
        if qk.shape[2] < self.config.bucket_size:
            self.attention_backend = "full attention (seq_len < bucket_size)"
        else:
            self._record_backend(qk)
        return lsh_attention(qk, v, **self._lsh_arguments())

    def _record_backend(self, x: torch.Tensor) -> None:
        """Set `attention_backend` to the backend that runs the core for x's device and dtype."""
        c = self.config
        self.attention_backend = resolve_backend(
            c.backend, x.device, x.dtype, head_dim=c.head_dim, bucket_size=c.bucket_size, dup_correction=c.dup_correction
        )

    def _lsh_arguments(self) -> dict:
        c = self.config
        return dict(
            n_hashes=c.n_hashes,
            bucket_size=c.bucket_size,
            n_buckets=c.n_buckets,
            causal=c.causal,
            seed=c.seed,
            dup_correction=c.dup_correction,
            save_probs=c.save_probs,
            backend=c.backend,
        )

    def core_flops(self, batch: int, seq_len: int) -> int:
        """Hashing matmul plus, per round, seq_len x 2 * bucket_size QK and PV dot products per head."""
        c = self.config
        if seq_len < c.bucket_size:  # shared-QK full attention fallback
            return 2 * 2 * batch * seq_len * seq_len * c.d_model
        chunks = 2 * 2 * batch * c.n_hashes * seq_len * 2 * c.bucket_size * c.d_model
        return self.no_backward_flops(batch, seq_len) + chunks

    def no_backward_flops(self, batch: int, seq_len: int) -> int:
        """The forward FLOPs that have no backward: the hashing matmul (its argmax passes no gradient)."""
        c = self.config
        if seq_len < c.bucket_size:
            return 0
        rotations = sum(bucket_factors(c.n_buckets, seq_len, c.bucket_size)) // 2
        return 2 * batch * seq_len * c.d_model * c.n_hashes * rotations

    def core_bytes(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """`lsh_attention_bytes`, fused when the backend of the last forward was the C or Triton
        kernel (`attention_backend`; before any forward, the ops path); below bucket_size the
        shared-QK full attention (`full_attention_bytes`)."""
        c = self.config
        if seq_len < c.bucket_size:
            return full_attention_bytes(
                batch * c.n_heads, seq_len, c.head_dim, element_size, scaled=False, masks=1 + int(c.causal), normalize_keys=True
            )
        fused = any(str(self.attention_backend or "").startswith(name) for name in FUSED_BACKENDS)
        return lsh_attention_bytes(
            batch * c.n_heads,
            seq_len,
            c.head_dim,
            element_size,
            n_hashes=c.n_hashes,
            bucket_size=c.bucket_size,
            rotations=sum(bucket_factors(c.n_buckets, seq_len, c.bucket_size)) // 2,
            causal=c.causal,
            fused=fused,
            save_probs=c.save_probs,
        )

    def bytes_moved(self, batch: int, seq_len: int, element_size: int) -> Traffic:
        """The base class's bytes less the head merge: at seq_len >= bucket_size the projections write
        and read the packed [batch, seq_len, heads, 2 head_dim] table directly (no copies)."""
        c = self.config
        if seq_len < c.bucket_size:
            return super().bytes_moved(batch, seq_len, element_size)
        rows = batch * seq_len
        projections = linear(rows, c.d_model, 2 * c.d_model, element_size) + linear(rows, c.d_model, c.d_model, element_size)
        return projections + self.core_bytes(batch, seq_len, element_size)
