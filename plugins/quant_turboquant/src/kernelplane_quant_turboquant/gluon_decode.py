"""2-bit TurboQuant decode attention in Gluon: code bytes loaded straight into tensor-core operands.

``kernels.turboquant_attention_kernel`` is bound by instruction issue, and
part of its instructions move decoded values into the layout Triton picks
for the tensor-core operands. Gluon (Triton's layer where a kernel names its
layouts) lets this kernel load each thread's code bytes directly in the
operand layout of ``mma.sync`` (m16n8k16, float16), so its loop touches no
shared memory:

- scores ``S = Q K^T``: the queries (rotated, unit length; the GQA group's
  heads as rows of a 16-row tile) are the left operand, loaded once; a tile of
  keys is the right operand ``K^T [dims, keys]``, one code byte per element;
- ``P`` leaves the score product in the layout the value product takes as
  its left operand, and the values are its right operand ``V [keys, dims]``;
- a code byte holds four fields (``packing``), so one loaded byte serves
  the four per-field products;
- a field of four codes is decoded by ``prmt`` byte selectors into the four
  float16 centroids held in two registers (``prmt_asm``);
- one warp per program, many programs per SM (KV splits), and the next
  tile's codes are loaded while the current one is decoded.

Decode steps only (one query token per sequence), no sliding window, head
dims 64 or 128 (the ones tested). Its partial outputs have the Triton kernel's
layout, so ``kernels.combine_splits_kernel`` merges and de-rotates them; the
exact tail is read by the Triton kernel's tail-only launch. Measured against
the Triton kernel in ``benchmarks/bench_turboquant_gluon.py``; the backend
plans it where it won (BENCHMARKS.md). Triton's CPU interpreter cannot run
Gluon: on a CPU the tests compile it for sm_90, and the GPU runs them.
"""
from __future__ import annotations

from kernelplane_quant_turboquant.decode_asm import _half_bits

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # a Triton without Gluon: the backend never plans this kernel
    gluon = None

BLOCK_N = 32  # keys per step (64 spills registers; BENCHMARKS.md)
PROGRAMS_PER_SM = 32  # one-warp programs


def prmt_asm(field: int) -> str:
    """PTX decoding field ``field`` of four code bytes (``$2``, one register) into four
    float16 centroids (``$0, $1``, element 0 in the low half). ``$3`` and ``$7`` hold the
    four centroids in code order as float16 bits (``centroid_words``). A field's two bits
    of bytes 0 and 1 become ``prmt`` byte selectors ``2c, 2c + 1`` for each code ``c`` in
    one multiply-add (``c * 0x22 + 0x1010`` on ``c0 | c1 << 8``; ``prmt`` reads only the
    low 16 bits of its selector, so bytes 2 and 3 may stay in the high half)."""
    lines = ["{", ".reg .b32 u, s0, s1;"]
    lines.append(f"shr.b32 u, $2, {2 * field};" if field else "mov.b32 u, $2;")
    lines += ["and.b32 u, u, 0x03030303;", "mad.lo.u32 s0, u, 0x22, 0x1010;",
              "shr.b32 s1, u, 16;", "mad.lo.u32 s1, s1, 0x22, 0x1010;",
              "prmt.b32 $0, $3, $7, s0;", "prmt.b32 $1, $3, $7, s1;", "}"]
    return "\n".join(lines)


FIELD_ASM = {f"A{i}": prmt_asm(i) for i in range(4)}  # the kernel's A0..A3


def centroid_words(table) -> tuple[int, int]:
    """The four 2-bit centroids (code order; exact in float16) as two 32-bit words of float16 bits."""
    bits = _half_bits([float(v) for v in table])
    as_int32 = [(w - (1 << 32)) if w >= 1 << 31 else w for w in (bits[0] | bits[1] << 16, bits[2] | bits[3] << 16)]
    return as_int32[0], as_int32[1]


def _jit(fn):
    return gluon.jit(fn) if gluon is not None else fn


@_jit
def _decode(codes, lo, hi, ASM: gl.constexpr):
    """Float16 centroids of one field of ``codes`` (bytes): ``prmt_asm`` on four elements per call."""
    lo_t = gl.full(codes.shape, lo, gl.int32, codes.type.layout)
    hi_t = gl.full(codes.shape, hi, gl.int32, codes.type.layout)
    return gl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r,r,r,r,r,r", [codes, lo_t, hi_t], dtype=gl.float16,
                                     is_pure=True, pack=4)


@_jit
def _load_tile(start, kv_hi, table_ptr, kc_head, vc_head, kn_head, vn_head, offs_kn, offs_kb, offs_vn, offs_vb, offs_sn,
               stride_kcb: gl.constexpr, stride_kct: gl.constexpr, stride_vcb: gl.constexpr, stride_vct: gl.constexpr,
               stride_knb: gl.constexpr, stride_knt: gl.constexpr, stride_vnb: gl.constexpr, stride_vnt: gl.constexpr,
               PAGE: gl.constexpr):
    tok = start + offs_kn
    ok = tok < kv_hi
    block = gl.load(table_ptr + tok // PAGE, mask=ok, other=0).to(gl.int64)
    krow = kc_head + block * stride_kcb + (tok % PAGE) * stride_kct
    kb = gl.load(gl.expand_dims(krow, 0) + gl.expand_dims(offs_kb, 1), mask=gl.expand_dims(ok, 0), other=0)
    tok_v = start + offs_vn
    ok_v = tok_v < kv_hi
    block_v = gl.load(table_ptr + tok_v // PAGE, mask=ok_v, other=0).to(gl.int64)
    vrow = vc_head + block_v * stride_vcb + (tok_v % PAGE) * stride_vct
    vb = gl.load(gl.expand_dims(vrow, 1) + gl.expand_dims(offs_vb, 0), mask=gl.expand_dims(ok_v, 1), other=0)
    tok_s = start + offs_sn
    ok_s = tok_s < kv_hi
    block_s = gl.load(table_ptr + tok_s // PAGE, mask=ok_s, other=0).to(gl.int64)
    kn = gl.load(kn_head + block_s * stride_knb + (tok_s % PAGE) * stride_knt, mask=ok_s, other=0.0).to(gl.float32)
    vn = gl.load(vn_head + block_s * stride_vnb + (tok_s % PAGE) * stride_vnt, mask=ok_s, other=0.0).to(gl.float32)
    return kb, vb, kn, vn, ok_s


@_jit
def tq2_decode_gluon(q_ptr, part_ptr, lse_ptr, kc_ptr, kn_ptr, vc_ptr, vn_ptr, k_lo, k_hi, v_lo, v_hi,
                     block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, tail_window, tail_capacity,
                     num_kv_heads, score_scale, value_scale, tokens_per_split,
                     stride_qt, stride_qh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_bt,
                     stride_kcb: gl.constexpr, stride_kct: gl.constexpr, stride_kch: gl.constexpr,
                     stride_knb: gl.constexpr, stride_knt: gl.constexpr, stride_knh: gl.constexpr,
                     stride_vcb: gl.constexpr, stride_vct: gl.constexpr, stride_vch: gl.constexpr,
                     stride_vnb: gl.constexpr, stride_vnt: gl.constexpr, stride_vnh: gl.constexpr,
                     GROUP: gl.constexpr, BLOCK_N: gl.constexpr, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr,
                     A0: gl.constexpr, A1: gl.constexpr, A2: gl.constexpr, A3: gl.constexpr,
                     HAS_TAIL: gl.constexpr):
    """Grid: (sequences, KV heads x splits); one warp. Decode only (at most one query token
    per sequence, at its last position, every earlier key visible). ``HAS_TAIL``: keys
    that the exact tail holds for the query (position 0 and the latest ``tail_window``,
    ``kernelplane.exact_tail``) are left to the tail's own launch. Writes the rotated partial outputs and base-2
    log-sum-exp of its split in the layout of ``kernels.turboquant_attention_kernel``, so
    ``kernels.combine_splits_kernel`` merges and de-rotates them. ``q_ptr``: queries already
    rotated (float32). ``k_lo, k_hi`` / ``v_lo, v_hi``: the key / value centroids
    (``centroid_words``); ``Ai``: the PTX decoding field i (``prmt_asm``)."""
    FW: gl.constexpr = HEAD_DIM // 4
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    ROWS: gl.constexpr = gl.SliceLayout(1, MMA)
    KEYS: gl.constexpr = gl.SliceLayout(0, MMA)

    seq = gl.program_id(0)
    kv_head = gl.program_id(1) % num_kv_heads
    split = gl.program_id(1) // num_kv_heads
    seq_len = gl.load(seq_lens_ptr + seq)
    token = gl.load(query_start_loc_ptr + seq)
    has_query = gl.load(query_start_loc_ptr + seq + 1) > token

    QL: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[4, 8], warps_per_cta=[1, 1],
                                        order=[1, 0])
    offs_qm = gl.arange(0, 16, layout=gl.SliceLayout(1, QL))
    offs_qc = gl.arange(0, FW, layout=gl.SliceLayout(0, QL))
    q_rows = q_ptr + token.to(gl.int64) * stride_qt + (kv_head * GROUP + offs_qm) * stride_qh
    q_ok = gl.expand_dims(offs_qm < GROUP, 1)
    q0 = gl.load(gl.expand_dims(q_rows, 1) + gl.expand_dims(offs_qc, 0), mask=q_ok, other=0.0)
    q1 = gl.load(gl.expand_dims(q_rows, 1) + gl.expand_dims(FW + offs_qc, 0), mask=q_ok, other=0.0)
    q2 = gl.load(gl.expand_dims(q_rows, 1) + gl.expand_dims(2 * FW + offs_qc, 0), mask=q_ok, other=0.0)
    q3 = gl.load(gl.expand_dims(q_rows, 1) + gl.expand_dims(3 * FW + offs_qc, 0), mask=q_ok, other=0.0)
    q_sq = gl.sum(q0 * q0, 1) + gl.sum(q1 * q1, 1) + gl.sum(q2 * q2, 1) + gl.sum(q3 * q3, 1)
    q_norm = gl.sqrt(q_sq)
    q_inv = gl.expand_dims(1.0 / gl.maximum(q_norm, 1e-30), 1)
    q0 = gl.convert_layout((q0 * q_inv).to(gl.float16), A)
    q1 = gl.convert_layout((q1 * q_inv).to(gl.float16), A)
    q2 = gl.convert_layout((q2 * q_inv).to(gl.float16), A)
    q3 = gl.convert_layout((q3 * q_inv).to(gl.float16), A)
    row_scale = gl.expand_dims(gl.convert_layout(q_norm * score_scale, ROWS), 1)

    kv_lo = split * tokens_per_split
    kv_hi = gl.minimum(seq_len, kv_lo + tokens_per_split)
    if HAS_TAIL:  # the codes cover positions 1 .. (the ring's first or the query's window start) - 1
        kv_lo = gl.maximum(kv_lo, 1)
        kv_hi = gl.minimum(kv_hi, gl.maximum(seq_len - tail_window, gl.maximum(seq_len - tail_capacity, 1)))
    kv_hi = gl.where(has_query, kv_hi, kv_lo)

    table_ptr = block_tables_ptr + seq.to(gl.int64) * stride_bt
    kc_head = kc_ptr + kv_head.to(gl.int64) * stride_kch
    vc_head = vc_ptr + kv_head.to(gl.int64) * stride_vch
    kn_head = kn_ptr + kv_head.to(gl.int64) * stride_knh
    vn_head = vn_ptr + kv_head.to(gl.int64) * stride_vnh
    offs_kn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, B))  # keys: columns of K^T
    offs_kb = gl.arange(0, FW, layout=gl.SliceLayout(1, B))  # bytes: rows of K^T
    offs_vn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, B))  # keys: rows of V
    offs_vb = gl.arange(0, FW, layout=gl.SliceLayout(0, B))  # bytes: columns of V
    offs_sn = gl.arange(0, BLOCK_N, layout=KEYS)

    acc0 = gl.zeros([16, FW], gl.float32, MMA)
    acc1 = gl.zeros([16, FW], gl.float32, MMA)
    acc2 = gl.zeros([16, FW], gl.float32, MMA)
    acc3 = gl.zeros([16, FW], gl.float32, MMA)
    m_i = gl.full([16], -1.0e30, gl.float32, ROWS)
    l_i = gl.zeros([16], gl.float32, ROWS)
    # Software prefetch: the next tile's codes and norms are loaded before this tile is decoded.
    kb, vb, kn, vn, ok_s = _load_tile(kv_lo, kv_hi, table_ptr, kc_head, vc_head, kn_head, vn_head, offs_kn, offs_kb,
                                      offs_vn, offs_vb, offs_sn, stride_kcb, stride_kct, stride_vcb, stride_vct,
                                      stride_knb, stride_knt, stride_vnb, stride_vnt, PAGE)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        nkb, nvb, nkn, nvn, nok_s = _load_tile(start + BLOCK_N, kv_hi, table_ptr, kc_head, vc_head, kn_head, vn_head,
                                               offs_kn, offs_kb, offs_vn, offs_vb, offs_sn, stride_kcb, stride_kct,
                                               stride_vcb, stride_vct, stride_knb, stride_knt, stride_vnb, stride_vnt,
                                               PAGE)
        s = gl.zeros([16, BLOCK_N], gl.float32, MMA)
        s = mma_v2(q0, _decode(kb, k_lo, k_hi, A0), s)
        s = mma_v2(q1, _decode(kb, k_lo, k_hi, A1), s)
        s = mma_v2(q2, _decode(kb, k_lo, k_hi, A2), s)
        s = mma_v2(q3, _decode(kb, k_lo, k_hi, A3), s)
        s = s * gl.expand_dims(kn, 0) * row_scale
        s = gl.where(gl.expand_dims(ok_s, 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        p = gl.convert_layout((p * gl.expand_dims(vn * value_scale, 0)).to(gl.float16), A)
        alpha = gl.expand_dims(alpha, 1)
        acc0 = mma_v2(p, _decode(vb, v_lo, v_hi, A0), acc0 * alpha)
        acc1 = mma_v2(p, _decode(vb, v_lo, v_hi, A1), acc1 * alpha)
        acc2 = mma_v2(p, _decode(vb, v_lo, v_hi, A2), acc2 * alpha)
        acc3 = mma_v2(p, _decode(vb, v_lo, v_hi, A3), acc3 * alpha)
        kb, vb, kn, vn, ok_s = nkb, nvb, nkn, nvn, nok_s

    seen = l_i > 0.0
    inv_l = gl.expand_dims(1.0 / gl.where(seen, l_i, 1.0), 1)
    offs_om = gl.arange(0, 16, layout=ROWS)
    offs_of = gl.arange(0, FW, layout=KEYS)
    head = kv_head * GROUP + offs_om
    row_ok = (offs_om < GROUP) & has_query
    o_ok = gl.expand_dims(row_ok, 1)
    parts = gl.expand_dims(part_ptr + token.to(gl.int64) * stride_pt + head * stride_ph + split * stride_ps, 1) + \
        gl.expand_dims(offs_of, 0)
    gl.store(parts, acc0 * inv_l, mask=o_ok)
    gl.store(parts + FW, acc1 * inv_l, mask=o_ok)
    gl.store(parts + 2 * FW, acc2 * inv_l, mask=o_ok)
    gl.store(parts + 3 * FW, acc3 * inv_l, mask=o_ok)
    lse = gl.where(seen, m_i + gl.log2(gl.where(seen, l_i, 1.0)), float("-inf"))
    gl.store(lse_ptr + token.to(gl.int64) * stride_lt + head * stride_lh + split, lse, mask=row_ok)
