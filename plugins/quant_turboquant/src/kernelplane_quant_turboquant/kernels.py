"""Triton attention straight from TurboQuant pages, and the split-KV combine.

Scores and the value sum are computed in the rotated basis, where the cache
lives: ``q . k = (R q) . (R k)`` and ``sum p v = R^T sum p (R v)``. So a
program rotates its queries once and streams packed codes and norms,
decoding each code to its centroid in registers (no K/V tile is ever written
to memory). Its output stays rotated: it is written, with its log-sum-exp,
as one partial of possibly several KV splits (flash-decoding), and
``combine_splits_kernel`` merges the partials of a (token, KV head) and
rotates the result back once.

A program owns one KV head, ``BLOCK_Q`` query tokens of one sequence and all
``GROUP`` query heads of that KV head (row ``m``: token ``m // GROUP``, head
``m % GROUP``), so each code is decoded once for the whole GQA group.
Softmax runs in base 2 (scores scaled by ``scale * log2(e)``).

Code layout (see ``packing``): code ``j`` of a row sits in byte
``j % part_bytes`` of each part, at bit ``p * (j // part_bytes)``.
Codes are sign-magnitude; ``table[code]`` is the centroid (standard-normal
units, so decoded unit-vector coordinates are ``table[code] / sqrt(d)``).
"""
from __future__ import annotations

import triton
import triton.language as tl

_NEG_BIG = tl.constexpr(-1.0e30)  # finite "-inf" for running maxima: no NaN from exp2(m_old - m_new)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``. ``UPCAST``: go through float32 (the CPU interpreter
    does not multiply 16-bit floats correctly); 16-bit products are exact in
    float32, so the result is the same."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _rotate_rows(x_ptrs, x_mask, rot_hi_ptr, rot_lo_ptr, ROWS: tl.constexpr, DIM: tl.constexpr,
                 CHUNK: tl.constexpr, UPCAST: tl.constexpr):
    """``x @ M`` in float32, for ``x [ROWS, DIM]`` read from memory at
    ``x_ptrs + column`` and ``M = hi + lo`` given as two bfloat16 ``[DIM, DIM]``
    matrices. Three bfloat16 products per chunk of ``CHUNK`` columns of x
    carry about 16 bits: a float32-accurate rotation on tensor cores, with
    only a ``[CHUNK, DIM]`` slice of M live at a time."""
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, DIM)
    acc = tl.zeros([ROWS, DIM], dtype=tl.float32)
    for c in tl.static_range(0, DIM, CHUNK):
        x = tl.load(x_ptrs + (c + offs_c)[None, :], mask=x_mask, other=0.0).to(tl.float32)
        m_offs = (c + offs_c)[:, None] * DIM + offs_d[None, :]
        m_hi = tl.load(rot_hi_ptr + m_offs)
        m_lo = tl.load(rot_lo_ptr + m_offs)
        x_hi = x.to(tl.bfloat16)
        x_lo = (x - x_hi.to(tl.float32)).to(tl.bfloat16)
        acc = _dot(x_hi, m_hi, acc, "ieee", UPCAST)
        acc = _dot(x_lo, m_hi, acc, "ieee", UPCAST)
        acc = _dot(x_hi, m_lo, acc, "ieee", UPCAST)
    return acc


@triton.jit
def _load_codes(row_ptr, row_mask, offs_d, BITS: tl.constexpr, DIM: tl.constexpr):
    """Integer codes ``[rows, DIM]`` of the packed rows starting at ``row_ptr [rows, 1]``."""
    if BITS == 3:  # a 2-bit part (DIM/4 bytes), then a 1-bit part (DIM/8 bytes)
        low = tl.load(row_ptr + (offs_d % (DIM // 4))[None, :], mask=row_mask, other=0).to(tl.int32)
        high = tl.load(row_ptr + (DIM // 4 + offs_d % (DIM // 8))[None, :], mask=row_mask, other=0).to(tl.int32)
        code = ((low >> (2 * (offs_d // (DIM // 4)))[None, :]) & 3) | (((high >> (offs_d // (DIM // 8))[None, :]) & 1) << 2)
    else:
        part: tl.constexpr = DIM * BITS // 8
        byte = tl.load(row_ptr + (offs_d % part)[None, :], mask=row_mask, other=0).to(tl.int32)
        code = (byte >> (BITS * (offs_d // part))[None, :]) & ((1 << BITS) - 1)
    return code


@triton.jit
def _centroids(code, table_ptr, BITS: tl.constexpr, LOOKUP: tl.constexpr):
    """Centroid values (float32) of integer codes.

    ``LOOKUP == 0``: gather from the table in memory (16 floats: stays in L1).
    ``LOOKUP == 1``: a select tree over the magnitude bits on values held in
    registers, then the sign bit set from the code's top bit.
    """
    if LOOKUP == 0:
        value = tl.load(table_ptr + code)
    else:
        b0 = (code & 1) != 0
        if BITS == 1:
            mag = tl.zeros(code.shape, dtype=tl.float32) + tl.load(table_ptr)
        elif BITS == 2:
            mag = tl.where(b0, tl.load(table_ptr + 1), tl.load(table_ptr))
        elif BITS == 3:
            b1 = (code & 2) != 0
            mag = tl.where(b1, tl.where(b0, tl.load(table_ptr + 3), tl.load(table_ptr + 2)),
                           tl.where(b0, tl.load(table_ptr + 1), tl.load(table_ptr)))
        else:
            b1 = (code & 2) != 0
            b2 = (code & 4) != 0
            low = tl.where(b1, tl.where(b0, tl.load(table_ptr + 3), tl.load(table_ptr + 2)),
                           tl.where(b0, tl.load(table_ptr + 1), tl.load(table_ptr)))
            high = tl.where(b1, tl.where(b0, tl.load(table_ptr + 7), tl.load(table_ptr + 6)),
                            tl.where(b0, tl.load(table_ptr + 5), tl.load(table_ptr + 4)))
            mag = tl.where(b2, high, low)
        sign = (code >> (BITS - 1)) << 31
        value = (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return value


@triton.jit
def turboquant_attention_kernel(
    q_ptr, part_ptr, lse_ptr,
    kc_ptr, kn_ptr, vc_ptr, vn_ptr, k_table_ptr, v_table_ptr, qrot_hi_ptr, qrot_lo_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    num_kv_heads, score_scale, value_scale, window, tokens_per_split,
    stride_qt, stride_qh,
    stride_kcb, stride_kct, stride_kch, stride_knb, stride_knt, stride_knh,
    stride_vcb, stride_vct, stride_vch, stride_vnb, stride_vnt, stride_vnh,
    stride_pt, stride_ph, stride_ps,
    stride_lt, stride_lh,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, ROT_CHUNK: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, LOOKUP: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid: (sequences, query tiles of ``BLOCK_Q`` tokens, KV heads x splits).

    ``score_scale`` = softmax scale * log2(e) / sqrt(head_dim) and
    ``value_scale`` = 1 / sqrt(head_dim_v) turn centroids into unit-vector
    coordinates. ``COMPUTE_DTYPE``: operand type of the two products
    (float16, or float32 for float32 queries). Writes rotated partial outputs ``[tokens, heads, splits,
    head_dim_v]`` (float32) and their base-2 log-sum-exp."""
    seq = tl.program_id(0)
    q_tile_start = tl.program_id(1) * BLOCK_Q
    kv_head = tl.program_id(2) % num_kv_heads
    split = tl.program_id(2) // num_kv_heads

    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # position of the sequence's first query token

    offs_m = tl.arange(0, BLOCK_M)
    row_token = offs_m // GROUP
    row_head = kv_head * GROUP + offs_m % GROUP
    row_valid = (row_token < BLOCK_Q) & (q_tile_start + row_token < q_len)
    token = (q_begin + q_tile_start + row_token).to(tl.int64)
    q_pos = context + q_tile_start + row_token

    # R q, once. 16-bit queries: the products run in float16 (three more
    # mantissa bits than bfloat16) on unit-length rows, so nothing overflows;
    # each row's length multiplies its scores instead.
    q_rows = q_ptr + token[:, None] * stride_qt + row_head[:, None] * stride_qh
    q = _rotate_rows(q_rows, row_valid[:, None], qrot_hi_ptr, qrot_lo_ptr, BLOCK_M, HEAD_DIM, ROT_CHUNK, UPCAST)
    q_len_row = tl.sqrt(tl.sum(q * q, 1))
    q = (q / tl.maximum(q_len_row, 1e-30)[:, None]).to(COMPUTE_DTYPE)
    row_scale = q_len_row * score_scale

    # Keys any row of this tile may see, within this program's split.
    first_pos = context + q_tile_start
    last_pos = context + tl.minimum(q_tile_start + BLOCK_Q, q_len) - 1
    kv_hi = seq_len
    if CAUSAL:
        kv_hi = tl.minimum(last_pos + 1, seq_len)
    kv_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(first_pos - window + 1, 0)
    kv_lo = tl.maximum(kv_lo, split * tokens_per_split)
    kv_hi = tl.minimum(kv_hi, (split + 1) * tokens_per_split)
    kv_hi = tl.where(q_tile_start < q_len, kv_hi, kv_lo)  # spare query tile: nothing to do

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kc_head = kc_ptr + kv_head.to(tl.int64) * stride_kch
    kn_head = kn_ptr + kv_head.to(tl.int64) * stride_knh
    vc_head = vc_ptr + kv_head.to(tl.int64) * stride_vch
    vn_head = vn_ptr + kv_head.to(tl.int64) * stride_vnh

    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
        tok = start + offs_n
        in_range = (tok >= kv_lo) & (tok < kv_hi)
        block = tl.load(table_ptr + tok // PAGE, mask=in_range, other=0).to(tl.int64)
        slot = tok % PAGE

        k_code = _load_codes((kc_head + block * stride_kcb + slot * stride_kct)[:, None], in_range[:, None],
                             offs_d, K_BITS, HEAD_DIM)
        k = _centroids(k_code, k_table_ptr, K_BITS, LOOKUP).to(q.dtype)
        k_norm = tl.load(kn_head + block * stride_knb + slot * stride_knt, mask=in_range, other=0.0).to(tl.float32)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
        s = s * row_scale[:, None] * k_norm[None, :]
        visible = in_range[None, :] & row_valid[:, None]
        if CAUSAL:
            visible = visible & (tok[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (tok[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v_code = _load_codes((vc_head + block * stride_vcb + slot * stride_vct)[:, None], in_range[:, None],
                             offs_dv, V_BITS, HEAD_DIM_V)
        v = _centroids(v_code, v_table_ptr, V_BITS, LOOKUP).to(q.dtype)
        v_norm = tl.load(vn_head + block * stride_vnb + slot * stride_vnt, mask=in_range, other=0.0).to(tl.float32)
        p = (p * (v_norm * value_scale)[None, :]).to(q.dtype)
        acc = _dot(p, v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new

    # A row that saw no key (an empty split) yields 0 with log-sum-exp -inf.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    part_ptrs = part_ptr + token[:, None] * stride_pt + row_head[:, None] * stride_ph + split * stride_ps + offs_dv[None, :]
    tl.store(part_ptrs, out, mask=row_valid[:, None])
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + token * stride_lt + row_head * stride_lh + split, lse, mask=row_valid)


@triton.jit
def combine_splits_kernel(
    part_ptr, lse_ptr, out_ptr, orot_hi_ptr, orot_lo_ptr, num_splits,
    stride_pt, stride_ph, stride_ps,
    stride_lt, stride_lh,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, ROT_CHUNK: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid: (tokens, KV heads). Merges the rotated partials of the group's
    query heads by their log-sum-exp, then rotates back: ``out = merged @ R``."""
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    offs_h = tl.arange(0, BLOCK_H)
    head = kv_head * GROUP + offs_h
    head_ok = offs_h < GROUP
    offs_s = tl.arange(0, BLOCK_S)
    lse_rows = lse_ptr + token * stride_lt + head * stride_lh
    lse = tl.load(lse_rows[:, None] + offs_s[None, :], mask=head_ok[:, None] & (offs_s[None, :] < num_splits),
                  other=float("-inf"))
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse - m[:, None]), 1)
    inv_total = 1.0 / tl.where(total > 0.0, total, 1.0)

    offs_c = tl.arange(0, ROT_CHUNK)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    part_rows = part_ptr + token * stride_pt + head * stride_ph
    out = tl.zeros([BLOCK_H, HEAD_DIM_V], dtype=tl.float32)
    for c in tl.static_range(0, HEAD_DIM_V, ROT_CHUNK):
        merged = tl.zeros([BLOCK_H, ROT_CHUNK], dtype=tl.float32)
        for s in range(num_splits):
            weight = tl.exp2(tl.load(lse_rows + s, mask=head_ok, other=float("-inf")) - m) * inv_total
            part = tl.load(part_rows[:, None] + s * stride_ps + (c + offs_c)[None, :], mask=head_ok[:, None], other=0.0)
            merged += part * weight[:, None]
        m_offs = (c + offs_c)[:, None] * HEAD_DIM_V + offs_dv[None, :]
        m_hi = tl.load(orot_hi_ptr + m_offs)
        m_lo = tl.load(orot_lo_ptr + m_offs)
        x_hi = merged.to(tl.bfloat16)
        x_lo = (merged - x_hi.to(tl.float32)).to(tl.bfloat16)
        out = _dot(x_hi, m_hi, out, "ieee", UPCAST)
        out = _dot(x_lo, m_hi, out, "ieee", UPCAST)
        out = _dot(x_hi, m_lo, out, "ieee", UPCAST)
    out_ptrs = out_ptr + token * stride_ot + head[:, None] * stride_oh + offs_dv[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
