"""The chunked attention core of LSH attention (`variants.attention.lsh`) over the hashed, sorted items.

Steps 3-5 of the trax / HuggingFace `LSHSelfAttention` algorithm (steps 1-2, hashing and the sort:
`lsh_hashing`):

3. split the sorted sequence of all rounds' items into chunks of bucket_size; each chunk attends to
   itself and to the chunk before it in the combined order, cyclically (the first chunk looks at
   the very last one, a round's first chunk at the previous round's last chunk);
4. keys are the length-normalised queries (`shared_qk_keys`); logits q . k with no other scaling;
   causal mask by original position (-1e9), then self penalty -1e5 (fp16: -1e4 / -1e3, as HF);
5. each round r gives o_r and the logsumexp z_r of its logits; unsort and combine
   out = sum_r softmax_r(z)_r * o_r.

How it runs (docs/performance.md has the measurements behind each choice): steps 3-5 are one
autograd Function, `LSHCore`, over a packed [B * L * H, 2 * head_dim] (qk | v) table (one row per
position and head), that walks the sorted items (`SortedItems`) in blocks of chunks small enough to
stay in cache on CPU: each block gathers its rows of the table into one reused buffer, reads each
chunk's window as a strided view (no look-back copies), and a hand-written backward gathers them
again and adds each block's gradients straight onto positions (index_add_). On CPU, where the
blocks are small, the only n_hashes * seq_len * head_dim buffer is the forward's sorted output
(freed once combined); the probabilities, n_hashes * seq_len * 2 * bucket_size per head, are the
largest saved tensor (none with save_probs=False, which recomputes them and the output in
backward); never seq_len^2. On CPU in float32 without dup_correction the fused C kernel (`lsh_cpu`)
runs the chunked part and its backward, with the same results (without save_probs the backward's
dY . Y pass stays on the ops path). The Triton kernels (`lsh_triton`) are this core's CUDA twin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torch.profiler import record_function

import variants.attention.lsh_cpu as lsh_cpu
from variants.attention.full import mask_values, shared_qk_key_scale, shared_qk_keys_backward


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


# Logit elements per block of chunks: on CPU a block's rows, logits and probabilities stay in cache
# (64 chunks of 64 x 128 measured fastest here, docs/performance.md); on CUDA one block usually
# covers everything.
CPU_BLOCK_ELEMENTS = 2**19
CUDA_BLOCK_ELEMENTS = 2**28

Block = tuple[slice, int, int]  # (heads, first chunk, number of chunks)


@dataclass
class SortedItems:
    """The hashed and sorted items of `lsh_attention_packed`, and how `LSHCore` walks them in blocks.

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
        """Chunks of `chunk` items in the sorted order of all rounds: n_hashes * seq_len // chunk."""
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


class LSHCore(torch.autograd.Function):
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
        """table [B * L * H, 2d] of (qk | v) rows -> the rounds' combined output [B * L * H, d]."""
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
        """grad_combined [B * L * H, d] -> (grad of the table [B * L * H, 2d], None for the items)."""
        with record_function("lsh/attend_backward"):
            return LSHCore._backward(ctx, grad_combined)

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
