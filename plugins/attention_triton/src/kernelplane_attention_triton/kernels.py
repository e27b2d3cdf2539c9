"""Triton kernels: paged attention with online softmax, and the split-KV combine.

One attention kernel serves every batch shape. A program owns one tile of
query rows and one KV head. Its rows are ``BLOCK_Q`` consecutive query tokens
of one sequence times ``HEADS`` query heads of that KV head's group, packed
token-major (row ``m`` is token ``m // HEADS``, head ``m % HEADS``), so each
K/V tile is loaded once for the whole GQA group. Decode is the same kernel
with ``BLOCK_Q`` = 1 or a few tokens; prefill uses large tiles.

Keys are visited in tiles of ``BLOCK_N`` tokens gathered straight from the
pages through the block table (no contiguous copy). The key range splits into
up to three parts: tiles some row may see only in part (masked) on both
sides, and the tiles every row sees whole (no mask, the fast loop).

With ``SPLIT`` the key range is also cut into chunks of ``tokens_per_split``
across the grid's third axis (flash-decoding): each program writes a
normalized partial output and its log-sum-exp, and ``combine_splits_kernel``
merges them. Small batches with long contexts then still fill the GPU.

Softmax runs in base 2: scores are scaled by ``scale * log2(e)`` and
exponentiated with ``exp2``; a partial's log-sum-exp is in base 2 as well.
"""
from __future__ import annotations

import triton
import triton.language as tl

# A finite "minus infinity" for the running max: keeps exp2(m_old - m_new)
# free of NaN while a row has seen no visible key yet.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + a @ b``. With ``UPCAST_DOT`` the operands go through float32
    first: Triton's CPU interpreter multiplies bfloat16 operands' raw bits.
    Products of 16-bit floats are exact in float32, so the result is the same."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, q_pos,
    k_head_ptr, v_head_ptr, table_ptr, seq_len, window, scale_log2,
    stride_kb, stride_kt, stride_vb, stride_vt,
    tile_begin, tile_end,
    offs_n, offs_d, offs_dv,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) over key tiles [tile_begin, tile_end)."""
    for tile in range(tile_begin, tile_end):
        tok = tile * BLOCK_N + offs_n
        if MASKED:
            in_seq = tok < seq_len
            block = tl.load(table_ptr + tok // PAGE, mask=in_seq, other=0).to(tl.int64)
        else:
            block = tl.load(table_ptr + tok // PAGE).to(tl.int64)
        slot = tok % PAGE
        k_ptrs = k_head_ptr + (block * stride_kb + slot * stride_kt)[:, None] + offs_d[None, :]
        v_ptrs = v_head_ptr + (block * stride_vb + slot * stride_vt)[:, None] + offs_dv[None, :]

        k_mask = None
        v_mask = None
        if MASKED:
            k_mask = in_seq[:, None]
            v_mask = in_seq[:, None]
        if HEAD_DIM != BLOCK_D:
            k_mask = (offs_d[None, :] < HEAD_DIM) if k_mask is None else (k_mask & (offs_d[None, :] < HEAD_DIM))
        if HEAD_DIM_V != BLOCK_DV:
            v_mask = (offs_dv[None, :] < HEAD_DIM_V) if v_mask is None else (v_mask & (offs_dv[None, :] < HEAD_DIM_V))

        if k_mask is None:
            k = tl.load(k_ptrs).to(q.dtype)
        else:
            k = tl.load(k_ptrs, mask=k_mask, other=0.0).to(q.dtype)
        s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
        s = s * scale_log2
        if MASKED:
            visible = in_seq[None, :]
            if CAUSAL:
                visible = visible & (tok[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (tok[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if v_mask is None:
            v = tl.load(v_ptrs).to(q.dtype)
        else:
            v = tl.load(v_ptrs, mask=v_mask, other=0.0).to(q.dtype)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    num_seqs, scale_log2, window, tokens_per_split,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_os,
    stride_lt, stride_lh,
    stride_bt,
    GROUP: tl.constexpr, HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
    TILE_PER_SEQ: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    tile_id = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)

    # Which sequence and which of its query tiles this program owns.
    if TILE_PER_SEQ:
        seq = tile_id
        q_tile_start = 0
    else:
        # Sequence b's tiles are numbered from query_start_loc[b] // BLOCK_Q + b
        # (strictly increasing in b): binary-search the last b at or below tile_id.
        lo = tl.full([], 0, tl.int32)
        hi = lo + num_seqs - 1
        for _ in range(SEARCH_STEPS):
            mid = (lo + hi + 1) // 2
            first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
            go_up = first_tile <= tile_id
            lo = tl.where(go_up, mid, lo)
            hi = tl.where(go_up, hi, mid - 1)
        seq = lo
        q_tile_start = (tile_id - (tl.load(query_start_loc_ptr + seq) // BLOCK_Q + seq)) * BLOCK_Q

    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    tile_is_real = q_tile_start < q_len  # else: the tile search's spare program, nothing to do
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # position of the sequence's first query token

    kv_head = head_block // (GROUP // HEADS)
    first_q_head = kv_head * GROUP + (head_block % (GROUP // HEADS)) * HEADS

    offs_m = tl.arange(0, BLOCK_M)
    row_token = offs_m // HEADS
    row_head = first_q_head + offs_m % HEADS
    row_valid = (row_token < BLOCK_Q) & (q_tile_start + row_token < q_len)
    token = (q_begin + q_tile_start + row_token).to(tl.int64)
    q_pos = context + q_tile_start + row_token

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = q_ptr + token[:, None] * stride_qt + row_head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    # Key ranges in tokens. first/last_pos: positions of the tile's first and
    # last real query token. Some row may see [vis_lo, vis_hi); every row sees
    # [all_lo, all_hi).
    first_pos = context + q_tile_start
    last_pos = context + tl.minimum(q_tile_start + BLOCK_Q, q_len) - 1
    if CAUSAL:
        vis_hi = tl.minimum(last_pos + 1, seq_len)
        all_hi = tl.minimum(first_pos + 1, seq_len)
    else:
        vis_hi = seq_len
        all_hi = seq_len
    if HAS_WINDOW:
        vis_lo = tl.maximum(first_pos - window + 1, 0)
        all_lo = tl.maximum(last_pos - window + 1, 0)
    else:
        vis_lo = 0
        all_lo = 0
    # ... in key tiles: [t0, t1) masked, [t1, t2) whole, [t2, t3) masked.
    t0 = vis_lo // BLOCK_N
    t3 = tl.cdiv(vis_hi, BLOCK_N)
    t1 = tl.minimum(tl.maximum(tl.cdiv(all_lo, BLOCK_N), t0), t3)
    t2 = tl.minimum(tl.maximum(all_hi // BLOCK_N, t1), t3)
    t3 = tl.where(tile_is_real, t3, t0)
    t2 = tl.minimum(t2, t3)
    t1 = tl.minimum(t1, t3)
    if SPLIT:
        s0 = split * (tokens_per_split // BLOCK_N)
        # The last split runs to the end, whatever max_seq_len the host planned with.
        s1 = tl.where(split == tl.num_programs(2) - 1, t3, s0 + tokens_per_split // BLOCK_N)
        t0 = tl.maximum(t0, s0)
        t1 = tl.maximum(t1, s0)
        t2 = tl.minimum(t2, s1)
        t3 = tl.minimum(t3, s1)

    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head_ptr = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head_ptr = v_ptr + kv_head.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, k_head_ptr, v_head_ptr, table_ptr, seq_len, window, scale_log2,
        stride_kb, stride_kt, stride_vb, stride_vt, t0, tl.minimum(t1, t3), offs_n, offs_d, offs_dv,
        True, CAUSAL, HAS_WINDOW, PAGE, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_PRECISION, UPCAST_DOT)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, k_head_ptr, v_head_ptr, table_ptr, seq_len, window, scale_log2,
        stride_kb, stride_kt, stride_vb, stride_vt, tl.maximum(t1, t0), t2, offs_n, offs_d, offs_dv,
        False, CAUSAL, HAS_WINDOW, PAGE, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_PRECISION, UPCAST_DOT)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, k_head_ptr, v_head_ptr, table_ptr, seq_len, window, scale_log2,
        stride_kb, stride_kt, stride_vb, stride_vt, tl.maximum(t2, t0), t3, offs_n, offs_d, offs_dv,
        True, CAUSAL, HAS_WINDOW, PAGE, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, DOT_PRECISION, UPCAST_DOT)

    # A row that saw no key (an empty split) yields 0 with log-sum-exp -inf.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + token[:, None] * stride_ot + row_head[:, None] * stride_oh + offs_dv[None, :]
    out_mask = row_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    if SPLIT:
        tl.store(out_ptrs + split * stride_os, out, mask=out_mask)
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + token * stride_lt + row_head * stride_lh + split, lse, mask=row_valid)
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def combine_splits_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits,
    stride_pt, stride_ph, stride_ps,
    stride_lt, stride_lh,
    stride_ot, stride_oh,
    HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge the normalized partial outputs of one (token, head) by their log-sum-exp."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(lse_ptr + token * stride_lt + head * stride_lh + offs_s, mask=offs_s < num_splits,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.exp2(lse - m)
    total = tl.sum(weight, 0)
    parts = tl.load(part_ptr + token * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps + offs_dv[None, :],
                    mask=(offs_s[:, None] < num_splits) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_dv, out.to(out_ptr.dtype.element_ty),
             mask=offs_dv < HEAD_DIM_V)
