"""The Triton kernels' bodies (jitted on first use by `lsh_triton`, so TRITON_INTERPRET is read then).

Shapes: table [B * L * H, 2 * D] (qk | v per row), key_scale [B * L * H] fp32, sort_idx [BH, N]
(item id r * L + position of each sorted index), per-item row max / scale [BH, N] fp32. A program
handles BLOCK_M consecutive sorted queries of head bh (within one chunk); its window is sorted
indices chunk * CHUNK - CHUNK .. chunk * CHUNK + CHUNK (mod N), walked in blocks of BLOCK_N keys.
"""

import triton.language as tl


def forward_kernel(
    table_ptr,
    scale_ptr,
    sort_ptr,
    max_ptr,
    sum_ptr,  # pass 0: row sums (written); pass 1: w / l per item (read)
    out_ptr,  # [B * L * H, D] fp32, pass 1 adds w P V onto it
    n_items,
    seq_len,
    heads,
    mask_value,
    self_value,
    CHUNK: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot's input_precision for float32 tiles ("ieee" or "tf32")
    PASS: tl.constexpr,
):
    """Grid (N / BLOCK_M, BH). PASS 0: each sorted query's row max and row sum of exp(logit - max)
    over its window -> max_ptr, sum_ptr [BH, N] fp32; PASS 1: adds (w / l) exp(logit - max) V onto
    out_ptr [B * L * H, D] fp32 at the query's position (atomics: one add per round)."""
    bh = tl.program_id(1)
    start = tl.program_id(0) * BLOCK_M
    b = bh // heads
    h = bh % heads
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    sort_base = sort_ptr + bh.to(tl.int64) * n_items
    item_base = bh.to(tl.int64) * n_items
    q_pos = tl.load(sort_base + offs_m) % seq_len
    q_row = ((b * seq_len + q_pos) * heads + h).to(tl.int64)
    q = tl.load(table_ptr + q_row[:, None] * (2 * D) + offs_d[None, :])
    window = (start // CHUNK) * CHUNK - CHUNK + n_items  # + n_items: kept non-negative for the modulo
    if PASS == 0:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    else:
        m_i = tl.load(max_ptr + item_base + offs_m)
        w_i = tl.load(sum_ptr + item_base + offs_m)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
    for first in tl.static_range(0, 2 * CHUNK, BLOCK_N):
        offs_n = (window + first + tl.arange(0, BLOCK_N)) % n_items
        k_pos = tl.load(sort_base + offs_n) % seq_len
        k_row = ((b * seq_len + k_pos) * heads + h).to(tl.int64)
        k_raw = tl.load(table_ptr + k_row[:, None] * (2 * D) + offs_d[None, :])
        k_scale = tl.load(scale_ptr + k_row)
        keys = (k_raw.to(tl.float32) * k_scale[:, None]).to(q.dtype)
        s = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
        if CAUSAL:
            s = tl.where(q_pos[:, None] < k_pos[None, :], mask_value, s)
        s = tl.where(q_pos[:, None] == k_pos[None, :], self_value, s)
        if PASS == 0:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_i = m_new
        else:
            p = tl.exp(s - m_i[:, None]) * w_i[:, None]
            v = tl.load(table_ptr + k_row[:, None] * (2 * D) + D + offs_d[None, :])
            acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    if PASS == 0:
        tl.store(max_ptr + item_base + offs_m, m_i)
        tl.store(sum_ptr + item_base + offs_m, l_i)
    else:
        tl.atomic_add(out_ptr + q_row[:, None] * D + offs_d[None, :], acc)


def backward_kernel(
    table_ptr,
    scale_ptr,
    sort_ptr,
    max_ptr,
    weight_ptr,  # w / l per item
    grad_out_ptr,  # dY [B * L * H, D]
    grad_dot_ptr,  # dY . Y [B * L * H] fp32
    grad_ptr,  # [B * L * H, 2 * D] fp32, gradients added onto it
    n_items,
    seq_len,
    heads,
    mask_value,
    self_value,
    CHUNK: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (N / BLOCK_M, BH): recomputes the block's probabilities from max_ptr and weight_ptr [BH, N]
    fp32 and adds dq (its queries), dk through the key normalisation and dv (its window's keys) onto
    grad_ptr [B * L * H, 2 * D] fp32 at their positions (atomics)."""
    bh = tl.program_id(1)
    start = tl.program_id(0) * BLOCK_M
    b = bh // heads
    h = bh % heads
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    sort_base = sort_ptr + bh.to(tl.int64) * n_items
    item_base = bh.to(tl.int64) * n_items
    q_pos = tl.load(sort_base + offs_m) % seq_len
    q_row = ((b * seq_len + q_pos) * heads + h).to(tl.int64)
    q = tl.load(table_ptr + q_row[:, None] * (2 * D) + offs_d[None, :])
    d_out = tl.load(grad_out_ptr + q_row[:, None] * D + offs_d[None, :]).to(q.dtype)
    d_dot = tl.load(grad_dot_ptr + q_row)
    m_i = tl.load(max_ptr + item_base + offs_m)
    w_i = tl.load(weight_ptr + item_base + offs_m)
    d_query = tl.zeros([BLOCK_M, D], tl.float32)
    window = (start // CHUNK) * CHUNK - CHUNK + n_items
    for first in tl.static_range(0, 2 * CHUNK, BLOCK_N):
        offs_n = (window + first + tl.arange(0, BLOCK_N)) % n_items
        k_pos = tl.load(sort_base + offs_n) % seq_len
        k_row = ((b * seq_len + k_pos) * heads + h).to(tl.int64)
        k_raw = tl.load(table_ptr + k_row[:, None] * (2 * D) + offs_d[None, :])
        k_scale = tl.load(scale_ptr + k_row)
        keys = (k_raw.to(tl.float32) * k_scale[:, None]).to(q.dtype)
        v = tl.load(table_ptr + k_row[:, None] * (2 * D) + D + offs_d[None, :])
        s = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
        constant = q_pos[:, None] == k_pos[None, :]
        if CAUSAL:
            later = q_pos[:, None] < k_pos[None, :]
            s = tl.where(later, mask_value, s)
            constant = constant | later
        s = tl.where(q_pos[:, None] == k_pos[None, :], self_value, s)
        p = tl.exp(s - m_i[:, None]) * w_i[:, None]  # w P
        d_value = tl.dot(tl.trans(p.to(q.dtype)), d_out, input_precision=PRECISION)
        d_p = tl.dot(d_out, tl.trans(v), input_precision=PRECISION)
        d_s = tl.where(constant, 0.0, p * (d_p - d_dot[:, None]))  # constant logits pass no gradient
        d_query += tl.dot(d_s.to(q.dtype), keys, input_precision=PRECISION)
        d_keys = tl.dot(tl.trans(d_s.to(q.dtype)), q, input_precision=PRECISION)
        # through k = s q: dq = s dk - q (q . dk) s^3, one factor of s at a time (fp32 range)
        k_f = k_raw.to(tl.float32)
        along = tl.sum(k_f * d_keys, 1) * k_scale * k_scale * k_scale
        d_qk = d_keys * k_scale[:, None] - k_f * along[:, None]
        tl.atomic_add(grad_ptr + k_row[:, None] * (2 * D) + offs_d[None, :], d_qk)
        tl.atomic_add(grad_ptr + k_row[:, None] * (2 * D) + D + offs_d[None, :], d_value)
    tl.atomic_add(grad_ptr + q_row[:, None] * (2 * D) + offs_d[None, :], d_query)


def hash_kernel(
    table_ptr,  # [B * L * H, 2 * D]: qk in the first D columns
    rot_ptr,  # [H, D, R, S] rotations in the table's dtype, S = (F0 + F1) / 2
    bucket_ptr,  # [BH, R * L] int64, written: bucket + r * F0 * F1 of item r * L + position
    seq_len,
    heads,
    n_hashes,
    D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    F0: tl.constexpr,  # buckets of the first factor (even)
    F1: tl.constexpr,  # of the second (1: one factor)
    P0: tl.constexpr,  # F0 / 2 rounded up to a power of two >= 16 (tile width)
    P1: tl.constexpr,
    S: tl.constexpr,  # rotations per round: F0 / 2 (+ F1 / 2)
    PRECISION: tl.constexpr,
):
    """Grid (L / BLOCK_L, BH): each position's bucket per round, round offset r * F0 * F1 included,
    -> bucket_ptr [BH, R * L] int64 (argmax over [xR, -xR] per factor; ties as torch.argmax)."""
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, D)
    rows = ((b * seq_len + offs_l) * heads + h).to(tl.int64)
    qk = tl.load(table_ptr + rows[:, None] * (2 * D) + offs_d[None, :])
    out_base = bucket_ptr + bh.to(tl.int64) * n_hashes * seq_len
    for r in range(n_hashes):
        rot_base = rot_ptr + (h * D * n_hashes + r) * S
        # first factor: argmax over concat([x R, -x R]) without building it (ties: the first half, the first index)
        cols = tl.arange(0, P0)
        rot = tl.load(rot_base + offs_d[:, None] * (n_hashes * S) + cols[None, :], mask=cols[None, :] < F0 // 2, other=0.0)
        x = tl.dot(qk, rot, input_precision=PRECISION).to(qk.dtype).to(tl.float32)  # rounded as the ops path's matmul
        valid = cols[None, :] < F0 // 2
        high = tl.where(valid, x, float("-inf"))
        low = tl.where(valid, x, float("inf"))
        top = tl.max(high, 1)
        bottom = tl.min(low, 1)
        bucket = tl.where(top >= -bottom, tl.argmax(high, 1), tl.argmin(low, 1) + F0 // 2).to(tl.int64)
        if F1 > 1:
            cols1 = tl.arange(0, P1)
            valid1 = cols1[None, :] < F1 // 2
            rot1 = tl.load(rot_base + F0 // 2 + offs_d[:, None] * (n_hashes * S) + cols1[None, :], mask=valid1, other=0.0)
            x1 = tl.dot(qk, rot1, input_precision=PRECISION).to(qk.dtype).to(tl.float32)
            high1 = tl.where(valid1, x1, float("-inf"))
            low1 = tl.where(valid1, x1, float("inf"))
            second = tl.where(tl.max(high1, 1) >= -tl.min(low1, 1), tl.argmax(high1, 1), tl.argmin(low1, 1) + F1 // 2)
            bucket += F0 * second.to(tl.int64)
        tl.store(out_base + r * seq_len + offs_l, bucket + r * (F0 * F1))
