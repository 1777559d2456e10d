"""LSH attention (Reformer): the functional API `lsh_attention` / `lsh_attention_packed` and variant `lsh`.

Exactly the trax / HuggingFace `LSHSelfAttention` algorithm (see docs/lsh.md and the reference
notes), in three modules: `lsh_hashing` hashes the shared qk vectors into buckets per round and
sorts all rounds' items by (bucket, position) (steps 1-2); `lsh_core` (`LSHCore`, an autograd
Function with a hand-written backward) attends each chunk of the sorted items to itself and the
chunk before, then combines the rounds (steps 3-5); this module checks the arguments, draws the
rotations, picks the backend, runs the two in turn and holds the registered `lsh` layer.

How it runs (docs/performance.md has the measurements behind each choice): the `lsh` module
projects qk and v with one matmul into a packed [batch, seq_len, heads, 2 * head_dim] table (one
row per position and head: its qk, then its v), so no head split or merge is copied. On CPU in
float32 a fused C kernel (`lsh_cpu`, built on first use) does the hashing and the sort, and
(without dup_correction) the chunked part and its backward, with the same results; without a C
compiler the PyTorch ops run (docs/lsh.md). On CUDA with triton installed, Triton kernels
(`lsh_triton`) run the hashing, steps 3-5 and their backward instead. `backend=` ('auto', 'ops',
'cpu_kernel', 'triton'; `lsh_backends`) picks one explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

import variants.attention.lsh_core as lsh_core
import variants.attention.lsh_cpu as lsh_cpu
import variants.attention.lsh_triton as lsh_triton
from variants.attention.base import AttentionConfig, AttentionModule
from variants.attention.full import full_attention, full_attention_bytes
from variants.attention.lsh_backends import check_backend_name, resolve_backend
from variants.attention.lsh_hashing import (
    bucket_factors,
    draw_rotations,
    hash_buckets,
    keep_buckets,
    per_head_rotations,
    replayed_buckets,
    sort_index,
)
from variants.registry import register, register_backend
from variants.traffic import INDEX_BYTES, Traffic, linear, matmul, pointwise, softmax

register_backend("lsh_cpu_kernel", lsh_cpu.status)  # which path LSH attention takes on CPU, in run records
register_backend("lsh_triton", lsh_triton.status)  # and whether the Triton kernels can run on CUDA


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
    items = lsh_core.SortedItems(
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
        block_elements=lsh_core.CUDA_BLOCK_ELEMENTS if device.type == "cuda" else lsh_core.CPU_BLOCK_ELEMENTS,
        cpu_kernel=kernel,
    )
    del rows
    # The core computes in the table's dtype (under autocast too: its out= matmuls and saved
    # buffers are of that dtype).
    with record_function("lsh/attend"), torch.autocast(device.type, enabled=False):
        out = lsh_core.LSHCore.apply(packed.reshape(-1, width), items)
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
