"""Experiment: 2-bit TurboQuant decode attention in Gluon, codes loaded straight into tensor-core operands.

The shipped decode kernel (``kernels.turboquant_attention_kernel``) is bound
by instruction issue, and part of its instructions move decoded values
into the layout of the tensor-core operands (BENCHMARKS.md, "Why it is
slow"). Triton picks that layout itself; Gluon (Triton's lower-level layer)
lets a kernel name it. This kernel loads each thread's code bytes directly
in the operand layout of ``mma.sync`` (m16n8k16, float16), so nothing goes
through shared memory in its loop:

- scores ``S = Q K^T``: the queries (rotated, unit length, 16 rows of which
  the GQA group uses 4) are the left operand, loaded once; a tile of keys is
  the right operand ``K^T [dims, keys]``, one code byte per element;
- ``P`` leaves the score product in the layout the next product takes as
  its left operand (no data movement), and the values are its right operand
  ``V [keys, dims]``;
- a code byte holds four fields (dims ``k``, ``d/4 + k``, ...; ``packing``),
  so one loaded byte serves the four per-field products;
- a field is decoded by a few PTX instructions per four codes: the codes
  become ``prmt`` selectors into the four float16 centroids held in two
  registers (``prmt_asm``);
- one warp per program, many programs per SM (splits of the KV range), and
  the next tile's codes are loaded before the current one is decoded.

Its partial outputs have the shipped kernel's layout, so the shipped split
combine merges and de-rotates them. The script checks it against the
reference attention on written pages and times it beside SDPA on bfloat16
K/V and the shipped kernel (CUDA-graph replays over >= 256 MB of cache, as
``bench_turboquant.py``). Without a GPU, ``--count`` compiles it for sm_90 and
counts its main loop's instructions per K/V element (``count_sass.py``).

    python benchmarks/bench_turboquant_gluon.py [--count]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import math
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from kernelplane_quant_turboquant.decode_asm import _half_bits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIGS = [(64, 16), (64, 32), (32, 32), (32, 48)]  # (keys per step, programs per SM)


def prmt_asm(table, field: int) -> str:
    """PTX decoding field ``field`` of four code bytes (one register) into four float16
    centroids (two registers, element 0 in the low half). ``table``: the four
    centroids in code order, exact in float16 (the 2-bit codebook is). A field's
    two bits of bytes 0 and 1 become ``prmt`` byte selectors ``2c, 2c + 1`` for
    each code ``c`` in one multiply-add (``c * 0x22 + 0x1010`` on ``c0 | c1 << 8``)."""
    bits = _half_bits([float(v) for v in table])
    lo, hi = bits[0] | bits[1] << 16, bits[2] | bits[3] << 16
    src = "$2"
    lines = ["{", ".reg .b32 t, s0, s1, lo, hi;", f"mov.b32 lo, {lo:#010x};", f"mov.b32 hi, {hi:#010x};"]
    if field:
        lines.append(f"shr.b32 t, $2, {2 * field};")
        src = "t"
    lines += [f"and.b32 s0, {src}, 0x0303;", "mad.lo.u32 s0, s0, 0x22, 0x1010;",
              f"shr.b32 s1, {src}, 16;", "and.b32 s1, s1, 0x0303;", "mad.lo.u32 s1, s1, 0x22, 0x1010;",
              "prmt.b32 $0, lo, hi, s0;", "prmt.b32 $1, lo, hi, s1;", "}"]
    return "\n".join(lines)


@gluon.jit
def _decode(codes, ASM: gl.constexpr):
    return gl.inline_asm_elementwise(ASM, "=r,=r,r", [codes], dtype=gl.float16, is_pure=True, pack=4)


@gluon.jit
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


@gluon.jit
def tq2_decode_gluon(q_ptr, part_ptr, lse_ptr, kc_ptr, kn_ptr, vc_ptr, vn_ptr,
                     block_tables_ptr, seq_lens_ptr, num_kv_heads, score_scale, value_scale, tokens_per_split,
                     stride_qt, stride_qh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_bt,
                     stride_kcb: gl.constexpr, stride_kct: gl.constexpr, stride_kch: gl.constexpr,
                     stride_knb: gl.constexpr, stride_knt: gl.constexpr, stride_knh: gl.constexpr,
                     stride_vcb: gl.constexpr, stride_vct: gl.constexpr, stride_vch: gl.constexpr,
                     stride_vnb: gl.constexpr, stride_vnt: gl.constexpr, stride_vnh: gl.constexpr,
                     GROUP: gl.constexpr, BLOCK_N: gl.constexpr, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr,
                     KA0: gl.constexpr, KA1: gl.constexpr, KA2: gl.constexpr, KA3: gl.constexpr,
                     VA0: gl.constexpr, VA1: gl.constexpr, VA2: gl.constexpr, VA3: gl.constexpr):
    """Grid: (sequences, KV heads x splits); one warp. Decode only (one query token per
    sequence, every cached key visible). Writes the rotated partial outputs and base-2
    log-sum-exp of its split in the layout of ``kernels.turboquant_attention_kernel``, so
    ``kernels.combine_splits_kernel`` merges and de-rotates them. ``q_ptr``: queries already
    rotated (float32). ``KAi``/``VAi``: the PTX decoding field i of the key / value codes."""
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

    QL: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[4, 8], warps_per_cta=[1, 1],
                                        order=[1, 0])
    offs_qm = gl.arange(0, 16, layout=gl.SliceLayout(1, QL))
    offs_qc = gl.arange(0, FW, layout=gl.SliceLayout(0, QL))
    q_rows = q_ptr + seq.to(gl.int64) * stride_qt + (kv_head * GROUP + offs_qm) * stride_qh
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
        s = mma_v2(q0, _decode(kb, KA0), s)
        s = mma_v2(q1, _decode(kb, KA1), s)
        s = mma_v2(q2, _decode(kb, KA2), s)
        s = mma_v2(q3, _decode(kb, KA3), s)
        s = s * gl.expand_dims(kn, 0) * row_scale
        s = gl.where(gl.expand_dims(ok_s, 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        p = gl.convert_layout((p * gl.expand_dims(vn * value_scale, 0)).to(gl.float16), A)
        alpha = gl.expand_dims(alpha, 1)
        acc0 = mma_v2(p, _decode(vb, VA0), acc0 * alpha)
        acc1 = mma_v2(p, _decode(vb, VA1), acc1 * alpha)
        acc2 = mma_v2(p, _decode(vb, VA2), acc2 * alpha)
        acc3 = mma_v2(p, _decode(vb, VA3), acc3 * alpha)
        kb, vb, kn, vn, ok_s = nkb, nvb, nkn, nvn, nok_s

    seen = l_i > 0.0
    inv_l = gl.expand_dims(1.0 / gl.where(seen, l_i, 1.0), 1)
    offs_om = gl.arange(0, 16, layout=ROWS)
    offs_of = gl.arange(0, FW, layout=KEYS)
    head = kv_head * GROUP + offs_om
    o_ok = gl.expand_dims(offs_om < GROUP, 1)
    parts = gl.expand_dims(part_ptr + seq.to(gl.int64) * stride_pt + head * stride_ph + split * stride_ps, 1) + \
        gl.expand_dims(offs_of, 0)
    gl.store(parts, acc0 * inv_l, mask=o_ok)
    gl.store(parts + FW, acc1 * inv_l, mask=o_ok)
    gl.store(parts + 2 * FW, acc2 * inv_l, mask=o_ok)
    gl.store(parts + 3 * FW, acc3 * inv_l, mask=o_ok)
    lse = gl.where(seen, m_i + gl.log2(gl.where(seen, l_i, 1.0)), float("-inf"))
    gl.store(lse_ptr + seq.to(gl.int64) * stride_lt + head * stride_lh + split, lse, mask=offs_om < GROUP)


# ---------------------------------------------------------------- host side

def launch(backend, quantizer, query, pages, meta, block_n: int, programs_per_sm: int, max_len: int, sm_count: int):
    """The Gluon kernel and the shipped split combine; ``[tokens, heads, dim]`` like ``backend.forward``."""
    from kernelplane_quant_turboquant import kernels
    from kernelplane_quant_turboquant.backend import _LOG2E, next_pow2

    req = backend.request
    hq, hkv, dim = req.num_heads, req.num_kv_heads, req.head_dim
    ops = backend._tensors_for(quantizer, query.device)
    t = pages.tensors
    kc, vc, kn, vn = t["key_codes"], t["value_codes"], t["key_norm"], t["value_norm"]
    batch = meta.num_seqs
    want = math.ceil(programs_per_sm * sm_count / (batch * hkv))
    splits = max(1, min(want, 256, max_len // 256))
    per_split = math.ceil(math.ceil(max_len / splits) / block_n) * block_n
    splits = math.ceil(max_len / per_split)
    q_in = torch.matmul(query.float(), ops["q_rot"])
    partial = torch.empty(batch, hq, splits, dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch, hq, splits, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, hq, dim, dtype=query.dtype, device=query.device)
    asm = {f"KA{i}": prmt_asm(quantizer.key_codec.table.tolist(), i) for i in range(4)}
    asm.update({f"VA{i}": prmt_asm(quantizer.value_codec.table.tolist(), i) for i in range(4)})
    tq2_decode_gluon[(batch, hkv * splits)](
        q_in, partial, lse, kc, kn, vc, vn, meta.block_tables, meta.seq_lens,
        hkv, req.softmax_scale * _LOG2E / math.sqrt(dim), 1.0 / math.sqrt(dim), per_split,
        q_in.stride(0), q_in.stride(1), partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1), meta.block_tables.stride(0),
        kc.stride(0), kc.stride(1), kc.stride(2), kn.stride(0), kn.stride(1), kn.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), vn.stride(0), vn.stride(1), vn.stride(2),
        GROUP=hq // hkv, BLOCK_N=block_n, PAGE=pages.block_size, HEAD_DIM=dim, **asm, num_warps=1)
    kernels.combine_splits_kernel[(batch, hkv)](
        partial, lse, out, ops["o_hi"], ops["o_lo"], splits,
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), GROUP=hq // hkv, BLOCK_H=max(16, next_pow2(hq // hkv)),
        BLOCK_S=max(2, next_pow2(splits)), HEAD_DIM_V=dim, ROT_CHUNK=32, UPCAST=False, num_warps=4)
    return out


def count() -> int:
    """Main-loop instructions per K/V element, compiled for sm_90 (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    import count_sass

    hkv, page, dim = count_sass.HKV, count_sass.PAGE, count_sass.D
    row = dim * 2 // 8
    table = [0.451171875, 1.5, -0.451171875, -1.5]
    print(f"triton {triton.__version__}, target sm_90, head dim {dim}, one warp")
    print("| keys/step | loop instructions | per K/V element | most frequent |\n|---|---|---|---|")
    for block_n in sorted({b for b, _ in CONFIGS}):
        fn = tq2_decode_gluon
        constants = dict(stride_kcb=hkv * page * row, stride_kct=row, stride_kch=page * row, stride_knb=hkv * page,
                         stride_knt=1, stride_knh=page, stride_vcb=hkv * page * row, stride_vct=row,
                         stride_vch=page * row, stride_vnb=hkv * page, stride_vnt=1, stride_vnh=page,
                         GROUP=count_sass.GROUP, BLOCK_N=block_n, PAGE=page, HEAD_DIM=dim,
                         **{f"{p}A{i}": prmt_asm(table, i) for p in "KV" for i in range(4)})
        pointers = dict(q_ptr="*fp32", part_ptr="*fp32", lse_ptr="*fp32", kc_ptr="*u8", kn_ptr="*fp16",
                        vc_ptr="*u8", vn_ptr="*fp16", block_tables_ptr="*i32", seq_lens_ptr="*i32")
        signature = {n: pointers.get(n, "constexpr" if n in constants else "fp32" if "scale" in n else "i32")
                     for n in fn.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                   if signature[n].startswith("*") or (n.startswith("stride") and n not in constants)}
        source = GluonASTSource(fn=fn, signature=signature, attrs=aligned,
                                constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1))
        ops = count_sass.main_loop(kernel.asm["cubin"])
        per_thread = block_n * dim * 2 / 32
        top = ", ".join(f"{op} {n}" for op, n in collections.Counter(ops).most_common(6))
        print(f"| {block_n} | {len(ops)} | {len(ops) / per_thread:.2f} | {top} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", action="store_true", help="only count the sm_90 main loop's instructions")
    args = ap.parse_args()
    if args.count:
        return count()
    if not torch.cuda.is_available():
        print("needs an NVIDIA GPU (or --count)")
        return 1
    import triton

    import bench_turboquant as bt
    from kernelplane import AttentionMetadata
    from kernelplane.reference.attention import ReferenceAttention

    device, fmt = "cuda", "turboquant2"
    gen = torch.Generator().manual_seed(0)
    bt.register_plugins()
    quantizer, backend, request = bt.quantizer_for(fmt), bt.tq_backend(fmt), bt.request_for(fmt)
    hq, hkv, dim = bt.HQ, bt.HKV, bt.D
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; Hq {hq} / Hkv {hkv}, head dim {dim}")

    # Correctness: written keys and values, ragged decode batch, against the reference on the same pages.
    lens = [8192, 3000, 17, 4096, 700]
    tables, used = bt.tables_for(lens, 16, 0, gen)
    pages = bt.random_tq_pool(quantizer, used + 2, device, gen)
    written = AttentionMetadata.build(lens, lens, tables, 16, device)
    quantizer.write(pages, torch.randn(sum(lens), hkv, dim, device=device, dtype=torch.bfloat16) * 3,
                    torch.randn(sum(lens), hkv, dim, device=device, dtype=torch.bfloat16), written.slot_mapping)
    meta = AttentionMetadata.build([1] * len(lens), lens, tables, 16, device)
    query = torch.randn(len(lens), hq, dim, device=device, dtype=torch.bfloat16)
    ref = ReferenceAttention(request).forward(query.float(), pages, meta)
    print(f"relative error against the reference: shipped kernel {bt.rel_err(backend.forward(query, pages, meta), ref):.2e}",
          end="")
    worst = 0.0
    for block_n, per_sm in CONFIGS:
        err = bt.rel_err(launch(backend, quantizer, query, pages, meta, block_n, per_sm, max(lens), sms), ref)
        worst = max(worst, err)
        print(f", Gluon {block_n}/{per_sm} {err:.2e}", end="")
    print()
    del pages
    if worst > 5e-3:
        print("Gluon kernel disagrees with the reference: no timing")
        return 1

    heads = " | ".join(f"Gluon {b} keys, {p}/SM µs" for b, p in CONFIGS)
    print(f"\n| B | L | SDPA bf16 µs | shipped µs | {heads} | best Gluon vs SDPA | vs shipped |")
    print("|---|---|---|---|" + "---|" * len(CONFIGS) + "---|---|")
    for batch, ctx in [(1, 4096), (16, 4096), (1, 32768), (4, 32768), (16, 32768), (16, 131072)]:
        sdpa = bt.time_sdpa(batch, ctx, device)
        metas, blocks = bt.decode_sets(batch, ctx, quantizer.bytes_per_token(hkv, dim, dim), device, gen)
        pages = bt.random_tq_pool(quantizer, blocks, device, gen)
        q = torch.randn(batch, hq, dim, device=device, dtype=torch.bfloat16)
        plans = [backend.plan(m, bits=2) for m in metas]
        shipped = bt.time_graph([lambda m=m, p=p: backend.forward(q, pages, m, plan=p) for m, p in zip(metas, plans)])
        ours = [bt.time_graph([lambda m=m: launch(backend, quantizer, q, pages, m, b, p, ctx, sms) for m in metas])
                for b, p in CONFIGS]
        best = min(ours)
        print(f"| {batch} | {ctx} | {sdpa * 1e6:.1f} | {shipped * 1e6:.1f} | "
              + " | ".join(f"{t * 1e6:.1f}" for t in ours) + f" | {sdpa / best:.2f}x | {shipped / best:.2f}x |",
              flush=True)
        del pages
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
