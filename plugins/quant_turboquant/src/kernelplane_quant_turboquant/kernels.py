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

Codes (layout in ``packing``) are read as 32-bit words and decoded one
field at a time: field ``f`` holds dims ``[f * d/F, (f+1) * d/F)`` and sits
at the same bit offset in every byte, so a field is a ``[keys, d/F]`` tile
decoded with constant shifts, and the products run per field (the query is
rotated into F column slices; the value accumulator is F slices). Codes are
sign-magnitude; ``table[code]`` is the centroid (standard-normal units, so
unit-vector coordinates are ``table[code] / sqrt(d)``). ``LOOKUP`` picks the
decoder: 0 a table gather, 1 a select tree (both portable), 2 byte-permute
(``prmt``) table lookups in PTX, four codes per instruction pair (NVIDIA
only; ``decode_asm`` builds its code), 3 (2 bits only) a float16 cubic with
no table (``cubic``; codes read as bytes), portable and the fastest.
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
def _rotate_cols(x_ptrs, x_mask, rot_hi_ptr, rot_lo_ptr, ROWS: tl.constexpr, DIM: tl.constexpr,
                 col0, COLS: tl.constexpr, CHUNK: tl.constexpr, UPCAST: tl.constexpr):
    """``(x @ M)[:, col0:col0+COLS]`` in float32, for ``x [ROWS, DIM]`` read from
    memory at ``x_ptrs + column`` and ``M = hi + lo`` given as two bfloat16
    ``[DIM, DIM]`` matrices. Three bfloat16 products per ``CHUNK`` columns of
    x carry about 16 bits: float32-accurate, on tensor cores."""
    offs_c = tl.arange(0, CHUNK)
    offs_o = col0 + tl.arange(0, COLS)
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    for c in tl.static_range(0, DIM, CHUNK):
        x = tl.load(x_ptrs + (c + offs_c)[None, :], mask=x_mask, other=0.0).to(tl.float32)
        m_offs = (c + offs_c)[:, None] * DIM + offs_o[None, :]
        m_hi = tl.load(rot_hi_ptr + m_offs)
        m_lo = tl.load(rot_lo_ptr + m_offs)
        x_hi = x.to(tl.bfloat16)
        x_lo = (x - x_hi.to(tl.float32)).to(tl.bfloat16)
        acc = _dot(x_hi, m_hi, acc, "ieee", UPCAST)
        acc = _dot(x_lo, m_hi, acc, "ieee", UPCAST)
        acc = _dot(x_hi, m_lo, acc, "ieee", UPCAST)
    return acc


@triton.jit
def _load_words(row_ptr, row_mask, BITS: tl.constexpr, WORDS: tl.constexpr, LOOKUP: tl.constexpr):
    """The main part ``[rows, WORDS]`` (int32) of packed rows at ``row_ptr [rows]``
    (an int32 pointer), and for 3 bits the extra word that goes with each main word.
    ``LOOKUP == 3`` (2 bits): the main part as ``[rows, 4 * WORDS]`` bytes (a
    uint8 pointer); the compiler then moves the codes, not the decoded values,
    into the tensor-core operand layout."""
    if LOOKUP == 3:
        offs_b = tl.arange(0, 4 * WORDS)
        main = tl.load(row_ptr[:, None] + offs_b[None, :], mask=row_mask[:, None], other=0)
        extra = main
    else:
        offs_w = tl.arange(0, WORDS)
        main = tl.load(row_ptr[:, None] + offs_w[None, :], mask=row_mask[:, None], other=0)
        if BITS == 3:
            extra = tl.load(row_ptr[:, None] + WORDS + (offs_w % (WORDS // 2))[None, :], mask=row_mask[:, None],
                            other=0)
        else:
            extra = main
    return main, extra


@triton.jit
def _centroids(code, table_ptr, BITS: tl.constexpr, LOOKUP: tl.constexpr):
    """Centroid values (float32) of integer codes: ``LOOKUP`` 0 gathers from the
    table in memory (it stays in L1), 1 walks a select tree over the magnitude
    bits on values held in registers and sets the sign bit from the top bit."""
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
def _cubic_field(codes, F: tl.constexpr, c0, c1, c2, c3):
    """Field ``F`` of 2-bit codes (bytes), decoded by the cubic of ``cubic``
    (exact in float16): the code's bits, read as the low mantissa of a float16
    of exponent ``10 - 2F``, give ``2**(10 - 2F) + code``, so one OR and one
    subtraction yield ``y = code - 2``."""
    bits = codes & (3 << (2 * F))
    y = (bits.to(tl.int16) | ((25 - 2 * F) << 10)).to(tl.float16, bitcast=True) - (1024.0 / (4 ** F) + 2.0)
    return ((c3 * y + c2) * y + c1) * y + c0


@triton.jit
def _field(main, extra, table_ptr, F: tl.constexpr, BITS: tl.constexpr, LOOKUP: tl.constexpr,
           ASM: tl.constexpr, OUT_DTYPE: tl.constexpr, c0, c1, c2, c3):
    """Decoded centroids of field ``F`` of a tile of rows: ``[rows, 4 * words]``
    in ``OUT_DTYPE``; column ``4w + k`` is byte ``k`` of main word ``w``
    (``LOOKUP == 3``: ``main`` holds the bytes; ``c0..c3`` the cubic)."""
    if LOOKUP == 3:
        out = _cubic_field(main, F, c0, c1, c2, c3)
    else:
        rows: tl.constexpr = main.shape[0]
        words: tl.constexpr = main.shape[1]
        if BITS == 4:
            shift: tl.constexpr = 4 * F
            mask: tl.constexpr = 15
        else:
            shift: tl.constexpr = 2 * F
            mask: tl.constexpr = 3
        if LOOKUP == 2:
            # PTX table lookups; every element carries its own word and shift (see decode_asm).
            byte_shift = tl.arange(0, 4) * 8 + shift
            word = tl.broadcast_to(main[:, :, None], [rows, words, 4])
            shifts = tl.broadcast_to(byte_shift[None, None, :], [rows, words, 4])
            if BITS == 3:
                top_shift = byte_shift[None, None, :] + (tl.arange(0, words) // (words // 2))[None, :, None]
                value = tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                                                  [word, tl.broadcast_to(extra[:, :, None], [rows, words, 4]), shifts,
                                                   tl.broadcast_to(top_shift, [rows, words, 4])],
                                                  dtype=tl.float16, is_pure=True, pack=4)
            else:
                value = tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r,r,r,r,r", [word, shifts],
                                                  dtype=tl.float16, is_pure=True, pack=4)
        else:
            byte_shift = tl.arange(0, 4) * 8 + shift
            code = (main[:, :, None] >> byte_shift[None, None, :]) & mask
            if BITS == 3:
                top_shift = byte_shift[None, None, :] + (tl.arange(0, words) // (words // 2))[None, :, None]
                code = code | (((extra[:, :, None] >> top_shift) & 1) << 2)
            value = _centroids(code, table_ptr, BITS, LOOKUP)
        out = tl.reshape(value, [rows, 4 * words])
    return out.to(OUT_DTYPE)


@triton.jit
def rotate_queries_kernel(q_ptr, out_ptr, rot_hi_ptr, rot_lo_ptr, num_rows, num_heads, stride_qt, stride_qh,
                          BLOCK_R: tl.constexpr, DIM: tl.constexpr, COLS: tl.constexpr, CHUNK: tl.constexpr,
                          UPCAST: tl.constexpr):
    """Grid: (row blocks, DIM / COLS). ``out[t, h] = q[t, h] @ M`` in float32 (``out``
    contiguous), ``COLS`` output columns per program: the decode plans rotate the queries
    once before the attention kernels, in one launch (a float32 copy and a matmul took
    two, about 10 µs at batch 16 on an H100)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * COLS
    ok = (rows < num_rows)[:, None]
    q_rows = q_ptr + ((rows // num_heads).to(tl.int64) * stride_qt + (rows % num_heads) * stride_qh)[:, None]
    out = _rotate_cols(q_rows, ok, rot_hi_ptr, rot_lo_ptr, BLOCK_R, DIM, col0, COLS, CHUNK, UPCAST)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * DIM + (col0 + tl.arange(0, COLS))[None, :], out, mask=ok)


@triton.jit
def _query_cols(q_rows, q_mask, rot_hi_ptr, rot_lo_ptr, ROWS: tl.constexpr, DIM: tl.constexpr,
                COL0: tl.constexpr, COLS: tl.constexpr, CHUNK: tl.constexpr, UPCAST: tl.constexpr,
                ROTATED: tl.constexpr):
    """Columns ``COL0:COL0+COLS`` of the rotated queries (float32): loaded when
    the rows in memory are already rotated, else rotated here."""
    if ROTATED:
        cols = tl.load(q_rows + (COL0 + tl.arange(0, COLS))[None, :], mask=q_mask, other=0.0)
    else:
        cols = _rotate_cols(q_rows, q_mask, rot_hi_ptr, rot_lo_ptr, ROWS, DIM, COL0, COLS, CHUNK, UPCAST)
    return cols


@triton.jit
def _softmax_step(s, m_i, l_i):
    """One online-softmax step over a tile of base-2 scores ``s [rows, keys]``:
    (weights, factor for the old sums, new running max, new running sum)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _mask_scores(s, key_pos, key_ok, q_pos, row_valid, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Scores ``s [rows, keys]`` with -inf where a row may not see a key."""
    visible = key_ok[None, :] & row_valid[:, None]
    if CAUSAL:
        visible = visible & (key_pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        visible = visible & (key_pos[None, :] > q_pos[:, None] - window)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _tail_cols(head_ptr, entry, held, stride_e, COL0: tl.constexpr, COLS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """Columns ``[COL0, COL0 + COLS)`` of exact-tail rows ``entry`` (zeros where not ``held``)."""
    cols = COL0 + tl.arange(0, COLS)
    x = tl.load(head_ptr + entry[:, None] * stride_e + cols[None, :], mask=held[:, None], other=0.0)
    return x.to(COMPUTE_DTYPE)


@triton.jit
def turboquant_attention_kernel(
    q_ptr, part_ptr, lse_ptr,
    kc_ptr, kn_ptr, vc_ptr, vn_ptr, k_table_ptr, v_table_ptr, qrot_hi_ptr, qrot_lo_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    tail_k_ptr, tail_v_ptr, seq_slots_ptr, tail_window, tail_capacity, tail_score_scale, tail_split,
    stride_tks, stride_tke, stride_tkh, stride_tvs, stride_tve, stride_tvh,
    num_kv_heads, score_scale, value_scale, window, tokens_per_split,
    stride_qt, stride_qh,
    stride_pt, stride_ph, stride_ps,
    stride_lt, stride_lh,
    stride_bt,
    stride_kcb: tl.constexpr, stride_kct: tl.constexpr, stride_kch: tl.constexpr,
    stride_knb: tl.constexpr, stride_knt: tl.constexpr, stride_knh: tl.constexpr,
    stride_vcb: tl.constexpr, stride_vct: tl.constexpr, stride_vch: tl.constexpr,
    stride_vnb: tl.constexpr, stride_vnt: tl.constexpr, stride_vnh: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, ROT_CHUNK: tl.constexpr,
    BITS: tl.constexpr, FIELDS: tl.constexpr, LOOKUP: tl.constexpr, K_ASM: tl.constexpr, V_ASM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROTATED_QUERY: tl.constexpr,
    TAIL: tl.constexpr,
):
    """Grid: (sequences, query tiles of ``BLOCK_Q`` tokens, KV heads x splits).

    ``kc_ptr``/``vc_ptr`` are the code pages as int32 words (strides in words;
    bytes and strides in bytes for ``LOOKUP == 3``).
    The page strides are compile-time constants (fixed per model), so the
    compiler sees that rows are 16-byte aligned and loads them in wide vectors.
    ``score_scale`` = softmax scale * log2(e) / sqrt(head_dim) and
    ``value_scale`` = 1 / sqrt(head_dim_v) turn centroids into unit-vector
    coordinates (times the decoder's unit for ``LOOKUP == 3``, ``cubic``).
    ``COMPUTE_DTYPE``: operand type of the two products (float16, or float32
    for float32 queries). Writes rotated partial outputs
    ``[tokens, heads, splits, head_dim_v]`` (float32) and their base-2
    log-sum-exp. ``ROTATED_QUERY``: ``q_ptr`` holds ``R q`` in float32
    already (one product for the whole batch instead of one per program).

    ``TAIL`` (``kernelplane.exact_tail``): a sequence's position 0 and its
    latest ``tail_window`` positions are read from the exact tail (rows
    ``[slot, entry, head, dim]``, already centred and rotated like the
    codes). 1: this launch reads the codes of the positions in between;
    2: it reads the tail alone (grid z = KV heads) and writes it as split
    ``tail_split`` (so 1 then 2: two launches of one source); 3: both, the
    last split reading the tail after its codes (one launch)."""
    FW: tl.constexpr = HEAD_DIM // FIELDS  # dims per field
    FWV: tl.constexpr = HEAD_DIM_V // FIELDS
    seq = tl.program_id(0)
    q_tile_start = tl.program_id(1) * BLOCK_Q
    kv_head = tl.program_id(2) % num_kv_heads
    split = tl.program_id(2) // num_kv_heads
    if TAIL == 2:
        split = tail_split

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

    # R q, once, as F column slices (one per field). 16-bit queries: the
    # products run in float16 (three more mantissa bits than bfloat16) on
    # unit-length rows, so nothing overflows; each row's length multiplies
    # its scores instead.
    q_rows = q_ptr + token[:, None] * stride_qt + row_head[:, None] * stride_qh
    q_mask = row_valid[:, None]
    q0 = _query_cols(q_rows, q_mask, qrot_hi_ptr, qrot_lo_ptr, BLOCK_M, HEAD_DIM, 0, FW, ROT_CHUNK, UPCAST,
                     ROTATED_QUERY)
    q1 = _query_cols(q_rows, q_mask, qrot_hi_ptr, qrot_lo_ptr, BLOCK_M, HEAD_DIM, FW, FW, ROT_CHUNK, UPCAST,
                     ROTATED_QUERY)
    q_sq = tl.sum(q0 * q0, 1) + tl.sum(q1 * q1, 1)
    if FIELDS == 4:
        q2 = _query_cols(q_rows, q_mask, qrot_hi_ptr, qrot_lo_ptr, BLOCK_M, HEAD_DIM, 2 * FW, FW, ROT_CHUNK, UPCAST,
                         ROTATED_QUERY)
        q3 = _query_cols(q_rows, q_mask, qrot_hi_ptr, qrot_lo_ptr, BLOCK_M, HEAD_DIM, 3 * FW, FW, ROT_CHUNK, UPCAST,
                         ROTATED_QUERY)
        q_sq += tl.sum(q2 * q2, 1) + tl.sum(q3 * q3, 1)
    q_norm = tl.sqrt(q_sq)
    q_inv = 1.0 / tl.maximum(q_norm, 1e-30)
    q0 = (q0 * q_inv[:, None]).to(COMPUTE_DTYPE)
    q1 = (q1 * q_inv[:, None]).to(COMPUTE_DTYPE)
    if FIELDS == 4:
        q2 = (q2 * q_inv[:, None]).to(COMPUTE_DTYPE)
        q3 = (q3 * q_inv[:, None]).to(COMPUTE_DTYPE)
    row_scale = q_norm * score_scale

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
    if TAIL != 0:
        # A row reads key j exact when the ring holds it (j == 0 or j >= ring_start) and j == 0 or
        # j > its position - tail_window; the codes give the rest.
        ring_start = tl.maximum(seq_len - tail_capacity, 1)
        kv_lo = tl.maximum(kv_lo, 1)
        kv_hi = tl.minimum(kv_hi, tl.maximum(last_pos - tail_window + 1, ring_start))
    kv_hi = tl.where(q_tile_start < q_len, kv_hi, kv_lo)  # spare query tile: nothing to do

    offs_n = tl.arange(0, BLOCK_N)
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kc_head = kc_ptr + kv_head.to(tl.int64) * stride_kch
    kn_head = kn_ptr + kv_head.to(tl.int64) * stride_knh
    vc_head = vc_ptr + kv_head.to(tl.int64) * stride_vch
    vn_head = vn_ptr + kv_head.to(tl.int64) * stride_vnh

    # LOOKUP == 3: the tables hold the K and V cubics' coefficients (unused otherwise).
    kc0, kc1 = tl.load(k_table_ptr).to(tl.float16), tl.load(k_table_ptr + 1).to(tl.float16)
    kc2, kc3 = tl.load(k_table_ptr + 2).to(tl.float16), tl.load(k_table_ptr + 3).to(tl.float16)
    vc0, vc1 = tl.load(v_table_ptr).to(tl.float16), tl.load(v_table_ptr + 1).to(tl.float16)
    vc2, vc3 = tl.load(v_table_ptr + 2).to(tl.float16), tl.load(v_table_ptr + 3).to(tl.float16)

    acc0 = tl.zeros([BLOCK_M, FWV], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, FWV], dtype=tl.float32)
    if FIELDS == 4:
        acc2 = tl.zeros([BLOCK_M, FWV], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_M, FWV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if TAIL != 2:  # the tail-only launch reads no codes
        for start in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
            tok = start + offs_n
            in_range = (tok >= kv_lo) & (tok < kv_hi)
            block = tl.load(table_ptr + tok // PAGE, mask=in_range, other=0).to(tl.int64)
            slot = tok % PAGE

            k_main, k_extra = _load_words(kc_head + block * stride_kcb + slot * stride_kct, in_range, BITS, FW // 4, LOOKUP)
            k_norm = tl.load(kn_head + block * stride_knb + slot * stride_knt, mask=in_range, other=0.0).to(tl.float32)
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            s = _dot(q0, tl.trans(_field(k_main, k_extra, k_table_ptr, 0, BITS, LOOKUP, K_ASM, COMPUTE_DTYPE,
                                         kc0, kc1, kc2, kc3)), s, PRECISION, UPCAST)
            s = _dot(q1, tl.trans(_field(k_main, k_extra, k_table_ptr, 1, BITS, LOOKUP, K_ASM, COMPUTE_DTYPE,
                                         kc0, kc1, kc2, kc3)), s, PRECISION, UPCAST)
            if FIELDS == 4:
                s = _dot(q2, tl.trans(_field(k_main, k_extra, k_table_ptr, 2, BITS, LOOKUP, K_ASM, COMPUTE_DTYPE,
                                             kc0, kc1, kc2, kc3)), s, PRECISION, UPCAST)
                s = _dot(q3, tl.trans(_field(k_main, k_extra, k_table_ptr, 3, BITS, LOOKUP, K_ASM, COMPUTE_DTYPE,
                                             kc0, kc1, kc2, kc3)), s, PRECISION, UPCAST)
            s = _mask_scores(s * row_scale[:, None] * k_norm[None, :], tok, in_range, q_pos, row_valid, window,
                             CAUSAL, HAS_WINDOW)
            if TAIL != 0 and BLOCK_Q > 1:  # one query token per tile: kv_hi already ends its codes
                from_codes = (tok[None, :] <= q_pos[:, None] - tail_window) | (tok[None, :] < ring_start)
                s = tl.where(from_codes, s, float("-inf"))
            p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)

            v_main, v_extra = _load_words(vc_head + block * stride_vcb + slot * stride_vct, in_range, BITS, FWV // 4, LOOKUP)
            v_norm = tl.load(vn_head + block * stride_vnb + slot * stride_vnt, mask=in_range, other=0.0).to(tl.float32)
            p = (p * (v_norm * value_scale)[None, :]).to(COMPUTE_DTYPE)
            acc0 = _dot(p, _field(v_main, v_extra, v_table_ptr, 0, BITS, LOOKUP, V_ASM, COMPUTE_DTYPE, vc0, vc1, vc2, vc3),
                        acc0 * alpha[:, None], PRECISION, UPCAST)
            acc1 = _dot(p, _field(v_main, v_extra, v_table_ptr, 1, BITS, LOOKUP, V_ASM, COMPUTE_DTYPE, vc0, vc1, vc2, vc3),
                        acc1 * alpha[:, None], PRECISION, UPCAST)
            if FIELDS == 4:
                acc2 = _dot(p, _field(v_main, v_extra, v_table_ptr, 2, BITS, LOOKUP, V_ASM, COMPUTE_DTYPE, vc0, vc1, vc2, vc3),
                            acc2 * alpha[:, None], PRECISION, UPCAST)
                acc3 = _dot(p, _field(v_main, v_extra, v_table_ptr, 3, BITS, LOOKUP, V_ASM, COMPUTE_DTYPE, vc0, vc1, vc2, vc3),
                            acc3 * alpha[:, None], PRECISION, UPCAST)
            m_i = m_new

    if TAIL >= 2:
        # Entry 0 holds position 0, entry 1 + p % capacity position p (exact_tail.py has the definition).
        slot = tl.load(seq_slots_ptr + seq).to(tl.int64)
        tk_head = tail_k_ptr + slot * stride_tks + kv_head.to(tl.int64) * stride_tkh
        tv_head = tail_v_ptr + slot * stride_tvs + kv_head.to(tl.int64) * stride_tvh
        reads_tail = q_tile_start < q_len
        if TAIL == 3:
            reads_tail = reads_tail & (split == tl.num_programs(2) // num_kv_heads - 1)
        entries = tl.where(reads_tail, tail_capacity + 1, 0)
        exact_scale = q_norm * tail_score_scale  # tail rows hold coordinates, not unit-vector centroids
        for e0 in tl.range(0, entries, BLOCK_N, num_stages=1):  # few rows: no pipelining buffers
            entry = e0 + offs_n
            back = ((seq_len - entry) % tail_capacity + tail_capacity) % tail_capacity
            pos = tl.where(entry == 0, 0, seq_len - 1 - back)
            held = (entry < entries) & ((entry == 0) | (pos >= ring_start))
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            s = _dot(q0, tl.trans(_tail_cols(tk_head, entry, held, stride_tke, 0, FW, COMPUTE_DTYPE)), s,
                     PRECISION, UPCAST)
            s = _dot(q1, tl.trans(_tail_cols(tk_head, entry, held, stride_tke, FW, FW, COMPUTE_DTYPE)), s,
                     PRECISION, UPCAST)
            if FIELDS == 4:
                s = _dot(q2, tl.trans(_tail_cols(tk_head, entry, held, stride_tke, 2 * FW, FW, COMPUTE_DTYPE)), s,
                         PRECISION, UPCAST)
                s = _dot(q3, tl.trans(_tail_cols(tk_head, entry, held, stride_tke, 3 * FW, FW, COMPUTE_DTYPE)), s,
                         PRECISION, UPCAST)
            s = _mask_scores(s * exact_scale[:, None], pos, held, q_pos, row_valid, window, CAUSAL, HAS_WINDOW)
            s = tl.where((pos[None, :] == 0) | (pos[None, :] > q_pos[:, None] - tail_window), s, float("-inf"))
            p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)
            p = p.to(COMPUTE_DTYPE)
            acc0 = _dot(p, _tail_cols(tv_head, entry, held, stride_tve, 0, FWV, COMPUTE_DTYPE), acc0 * alpha[:, None],
                        PRECISION, UPCAST)
            acc1 = _dot(p, _tail_cols(tv_head, entry, held, stride_tve, FWV, FWV, COMPUTE_DTYPE),
                        acc1 * alpha[:, None], PRECISION, UPCAST)
            if FIELDS == 4:
                acc2 = _dot(p, _tail_cols(tv_head, entry, held, stride_tve, 2 * FWV, FWV, COMPUTE_DTYPE),
                            acc2 * alpha[:, None], PRECISION, UPCAST)
                acc3 = _dot(p, _tail_cols(tv_head, entry, held, stride_tve, 3 * FWV, FWV, COMPUTE_DTYPE),
                            acc3 * alpha[:, None], PRECISION, UPCAST)
            m_i = m_new

    # A row that saw no key (an empty split) yields 0 with log-sum-exp -inf.
    seen = l_i > 0.0
    inv_l = 1.0 / tl.where(seen, l_i, 1.0)
    offs_f = tl.arange(0, FWV)
    part_ptrs = part_ptr + token[:, None] * stride_pt + row_head[:, None] * stride_ph + split * stride_ps + offs_f[None, :]
    tl.store(part_ptrs, acc0 * inv_l[:, None], mask=q_mask)
    tl.store(part_ptrs + FWV, acc1 * inv_l[:, None], mask=q_mask)
    if FIELDS == 4:
        tl.store(part_ptrs + 2 * FWV, acc2 * inv_l[:, None], mask=q_mask)
        tl.store(part_ptrs + 3 * FWV, acc3 * inv_l[:, None], mask=q_mask)
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + token * stride_lt + row_head * stride_lh + split, lse, mask=row_valid)


@triton.jit
def combine_splits_kernel(
    part_ptr, lse_ptr, out_ptr, orot_hi_ptr, orot_lo_ptr, num_splits,
    stride_pt, stride_ph, stride_ps,
    stride_lt, stride_lh,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, OUT_CHUNK: tl.constexpr, REPEAT: tl.constexpr, UPCAST: tl.constexpr,
    OUT_COLS: tl.constexpr,
):
    """Grid: (tokens, query heads / GROUP, HEAD_DIM_V / OUT_COLS). Merges the rotated partials of
    ``GROUP`` query heads (``BLOCK_H`` rows, padded to a power of two) by
    their log-sum-exp, then rotates back: ``out = merged @ R`` (``R`` in two
    bfloat16 parts, so the products are about float32-exact). Each load takes
    ``SPLIT_CHUNK`` splits of every column, so that a long split list costs
    few loads one after another (a column slice of every split, then the
    next slice, took four times as many). The product needs 16 rows: the
    merged rows go in ``REPEAT`` times and one copy comes out. ``OUT_COLS``:
    the output columns of one program (``HEAD_DIM_V``: all); programs of the same
    heads each merge the partials again, for more programs at small batches."""
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    offs_h = tl.arange(0, BLOCK_H)
    head = head_block * GROUP + offs_h
    head_ok = offs_h < GROUP
    offs_s = tl.arange(0, BLOCK_S)
    lse_rows = lse_ptr + token * stride_lt + head * stride_lh
    lse = tl.load(lse_rows[:, None] + offs_s[None, :], mask=head_ok[:, None] & (offs_s[None, :] < num_splits),
                  other=float("-inf"))
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse - m[:, None]), 1)
    inv_total = 1.0 / tl.where(total > 0.0, total, 1.0)

    offs_k = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, HEAD_DIM_V)
    part_rows = part_ptr + token * stride_pt + head * stride_ph
    merged = tl.zeros([BLOCK_H, HEAD_DIM_V], dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        split = s0 + offs_k
        ok = head_ok[:, None] & (split[None, :] < num_splits)
        weight = tl.exp2(tl.load(lse_rows[:, None] + split[None, :], mask=ok, other=float("-inf")) - m[:, None])
        part = tl.load(part_rows[:, None, None] + split[None, :, None] * stride_ps + offs_d[None, None, :],
                       mask=ok[:, :, None], other=0.0)
        merged += tl.sum(part * weight[:, :, None], 1)
    merged = merged * inv_total[:, None]
    merged = tl.reshape(tl.broadcast_to(merged[None, :, :], [REPEAT, BLOCK_H, HEAD_DIM_V]),
                        [REPEAT * BLOCK_H, HEAD_DIM_V])
    x_hi = merged.to(tl.bfloat16)
    x_lo = (merged - x_hi.to(tl.float32)).to(tl.bfloat16)

    offs_j = tl.arange(0, OUT_CHUNK)
    out_rows = out_ptr + token * stride_ot + head[:, None] * stride_oh
    for j in tl.static_range(0, OUT_COLS, OUT_CHUNK):
        j0 = tl.program_id(2) * OUT_COLS + j
        m_offs = offs_d[:, None] * HEAD_DIM_V + (j0 + offs_j)[None, :]
        m_hi = tl.load(orot_hi_ptr + m_offs)
        m_lo = tl.load(orot_lo_ptr + m_offs)
        out = tl.zeros([REPEAT * BLOCK_H, OUT_CHUNK], dtype=tl.float32)
        out = _dot(x_hi, m_hi, out, "ieee", UPCAST)
        out = _dot(x_lo, m_hi, out, "ieee", UPCAST)
        out = _dot(x_hi, m_lo, out, "ieee", UPCAST)
        out = tl.sum(tl.reshape(out, [REPEAT, BLOCK_H, OUT_CHUNK]), 0) * (1.0 / REPEAT)  # copies equal: exact
        tl.store(out_rows + (j0 + offs_j)[None, :], out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
