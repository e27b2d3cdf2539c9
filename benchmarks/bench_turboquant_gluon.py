"""The Gluon decode kernel (``gluon_decode``, 2-4 bits) against the Triton kernel, on the GPU.

``gluon_decode`` decodes code words straight into tensor-core operands (its
docstring has the design). The backend plans it for 2-bit decode batches
where it can run; this script shows why: for each shape it times, in one
run, SDPA on bfloat16 K/V (the peer), the Triton kernel's plan and the Gluon
plan in several variants (``VARIANTS``: the backend's default first, then
other numbers of rounds of resident programs and the earlier 32 programs per
SM) (CUDA-graph replays over >= 256 MB of cache, as ``bench_turboquant.py``),
after checking both against the reference attention on written pages. The
exact tail is off in that table; a second one times SmolLM2's shape (Hq 9 /
Hkv 3, head dim 64) with the engine's exact tail of 64 tokens, which the
Gluon kernel reads in programs of its own (the Triton plan in its last split
or by a second launch).

Without a GPU, ``--count`` compiles the kernel for sm_90 and counts its main
loop's instructions per K/V element (as ``count_sass.py`` does for the
Triton kernel).

    python benchmarks/bench_turboquant_gluon.py [--count] [--bits 3] [--registers 200,232]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Gluon plans timed: label -> plan keywords (the backend's default first).
VARIANTS = {
    "default": {},
    "3 rounds": dict(rounds=3),
    "32/SM": dict(programs_per_sm=32),
}
SHAPES = [(1, 4096), (16, 4096), (1, 32768), (4, 32768), (8, 32768), (16, 32768), (16, 131072)]


def count() -> int:
    import triton

    import count_sass

    from kernelplane_quant_turboquant import gluon_decode

    print(f"triton {triton.__version__}, target sm_90, one warp, {gluon_decode.MAX_REGISTERS} registers by bits, "
          f"{gluon_decode.BLOCK_N} keys per step, {gluon_decode.UNROLL} unmasked steps per loop iteration; a step "
          "without the rescale skips its branch (the running maximum stays); counts per step")
    print("| bits | head dim | loop instructions | per K/V element | without the rescale | per K/V element | "
          "most frequent |\n|---|---|---|---|---|---|---|")
    for bits, dim in ((2, 128), (2, 64), (3, 128), (3, 64), (4, 128), (4, 64)):
        kernel = count_sass.compile_gluon_case(dim=dim, bits=bits)
        spills = count_sass.local_memory_accesses(kernel.asm["cubin"])
        if spills:
            print(f"({bits} bits, head dim {dim}: {spills} local-memory accesses, registers spilled)")
        ops = count_sass.innermost_load_loop(kernel.asm["cubin"])
        steady = count_sass.without_branches(ops)
        steps = gluon_decode.UNROLL
        ops, steady = ops[:len(ops) // steps * steps], steady[:len(steady) // steps * steps]  # whole steps' share
        per_thread = steps * gluon_decode.BLOCK_N * dim * 2 / 32
        top = ", ".join(f"{op} {n}" for op, n in collections.Counter(steady).most_common(6))
        print(f"| {bits} | {dim} | {len(ops) / steps:.0f} | {len(ops) / per_thread:.2f} | {len(steady) / steps:.0f} | "
              f"{len(steady) / per_thread:.2f} | {top} |")
    return 0


def gluon_setup(bt, bits: int):
    """(the ``bits``-bit quantizer, the TurboQuant backend, its request) of ``bench_turboquant``'s
    shape, the GPU and versions printed; None, the reason printed, where the Gluon kernel
    cannot run."""
    import triton

    if not torch.cuda.is_available():
        print("needs an NVIDIA GPU")
        return None
    bt.register_plugins()
    fmt = f"turboquant{bits}"
    quantizer, backend, request = bt.quantizer_for(fmt), bt.tq_backend(fmt), bt.request_for(fmt)
    if backend.gluon_unavailable:
        print(f"the Gluon kernel cannot run here: {backend.gluon_unavailable}")
        return None
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"Hq {bt.HQ} / Hkv {bt.HKV}, head dim {bt.D}")
    return quantizer, backend, request


def written_decode_case(bt, quantizer, request, device, gen):
    """Correctness inputs: written keys and values (so the codes are real), a ragged decode
    batch with splits and masked ends; (pages, metadata, query, the reference attention's
    output on the same pages)."""
    from kernelplane import AttentionMetadata
    from kernelplane.reference.attention import ReferenceAttention

    hq, hkv, dim = request.num_heads, request.num_kv_heads, request.head_dim
    lens = [8192, 3000, 17, 4096, 700]
    tables, used = bt.tables_for(lens, 16, 0, gen)
    pages = bt.random_tq_pool(quantizer, used + 2, device, gen)
    written = AttentionMetadata.build(lens, lens, tables, 16, device)
    quantizer.write(pages, torch.randn(sum(lens), hkv, dim, device=device, dtype=torch.bfloat16) * 3,
                    torch.randn(sum(lens), hkv, dim, device=device, dtype=torch.bfloat16), written.slot_mapping)
    meta = AttentionMetadata.build([1] * len(lens), lens, tables, 16, device)
    query = torch.randn(len(lens), hq, dim, device=device, dtype=torch.bfloat16)
    return pages, meta, query, ReferenceAttention(request).forward(query.float(), pages, meta)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", action="store_true", help="only count the sm_90 main loop's instructions")
    ap.add_argument("--bits", type=int, default=2, choices=(2, 3, 4), help="the codes' width (default 2)")
    ap.add_argument("--registers", default="", metavar="N,N",
                    help="also time the Gluon plan under these register caps per thread")
    ap.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 shape with the exact tail")
    args = ap.parse_args()
    if args.count:
        return count()
    import bench_turboquant as bt

    device, gen = "cuda", torch.Generator().manual_seed(0)
    bits = args.bits
    variants = dict(VARIANTS)
    variants.update({f"{n} regs": dict(max_registers=int(n)) for n in args.registers.split(",") if n})
    setup = gluon_setup(bt, bits)
    if setup is None:
        return 1
    quantizer, backend, request = setup
    copy_bw = bt.copy_bandwidth(device)["copy"]
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (the roofline); {bits}-bit codes")
    hq, hkv, dim = bt.HQ, bt.HKV, bt.D
    pages, meta, query, ref = written_decode_case(bt, quantizer, request, device, gen)
    errors = {"Triton": bt.rel_err(backend.forward(query, pages, meta, backend.plan(meta, bits=bits, gluon=False)),
                                   ref)}
    for label, plan_kw in variants.items():
        plan = backend.plan(meta, bits=bits, gluon=True, **plan_kw)
        errors[f"Gluon {label}"] = bt.rel_err(backend.forward(query, pages, meta, plan), ref)
    print("relative error against the reference: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    del pages
    if max(errors.values()) > 5e-3:
        print("a kernel disagrees with the reference: no timing")
        return 1

    heads = " | ".join(f"Gluon {label} µs" for label in variants)
    print(f"\n| B | L | SDPA bf16 µs | Triton µs | {heads} | backend's choice (splits) | best Gluon vs SDPA | vs Triton "
          "| best Gluon, % of roofline |")
    print("|---|---|---|---|" + "---|" * len(variants) + "---|---|---|---|")
    for batch, ctx in SHAPES:
        sdpa = bt.time_sdpa(batch, ctx, device)
        per_token = quantizer.bytes_per_token(hkv, dim, dim)
        metas, blocks = bt.decode_sets(batch, ctx, per_token, device, gen)
        pages = bt.random_tq_pool(quantizer, blocks, device, gen)
        q = torch.randn(batch, hq, dim, device=device, dtype=torch.bfloat16)

        def timed(**plan_kw):
            plans = [backend.plan(m, bits=bits, **plan_kw) for m in metas]
            return bt.time_graph([lambda m=m, p=p: backend.forward(q, pages, m, plan=p) for m, p in zip(metas, plans)])

        triton_t = timed(gluon=False)
        ours = [timed(gluon=True, **plan_kw) for plan_kw in variants.values()]
        plan = backend.plan(metas[0], bits=bits)
        choice = f"{'Gluon' if plan.gluon else 'Triton'} ({plan.splits})"
        best = min(ours)
        print(f"| {batch} | {ctx} | {sdpa * 1e6:.1f} | {triton_t * 1e6:.1f} | "
              + " | ".join(f"{t * 1e6:.1f}" for t in ours)
              + f" | {choice} | {sdpa / best:.2f}x | {triton_t / best:.2f}x "
              f"| {batch * ctx * per_token / best / copy_bw:.0%} |", flush=True)
        del pages
        torch.cuda.empty_cache()
    if not args.no_smollm2:
        smollm2_with_tail(bt, gen, bits)
    return 0


def smollm2_with_tail(bt, gen, bits: int) -> None:
    """SmolLM2-135M's attention shape with the exact tail, as the engine runs it."""
    from kernelplane import AttentionMetadata, AttentionRequest, KVQuantRequest, select
    from kernelplane.exact_tail import ExactTail

    hq, hkv, dim, tail = 9, 3, 64, 64
    request = AttentionRequest(num_heads=hq, num_kv_heads=hkv, head_dim=dim, dtype="bfloat16",
                               kv_cache_format=f"turboquant{bits}", block_size=16)
    quantizer = select("kv_quantizer", KVQuantRequest(format=f"turboquant{bits}", num_kv_heads=hkv, head_dim=dim,
                                                      dtype="bfloat16")).implementation
    backend = select("attention", request, override="turboquant").implementation
    print(f"\nSmolLM2 shape (Hq {hq} / Hkv {hkv}, head dim {dim}), exact tail {tail}, µs")
    print("| B | L | Triton, tail in its last split | Triton, tail by a second launch | Gluon default | "
          "backend's choice |\n|---|---|---|---|---|---|")
    for batch, ctx in [(1, 1536), (4, 1536), (16, 1536), (64, 1536), (1, 4096), (4, 4096), (16, 4096), (64, 4096),
                       (128, 1536)]:
        tables, used = bt.tables_for([ctx] * batch, 16, 0, gen)
        pages = quantizer.allocate(used, 16, hkv, dim, dim, "cuda")
        for name, t in pages.tensors.items():
            t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8)) if name.endswith("codes") else t.uniform_(0.5, 20)
        pages.exact_tail = ExactTail.allocate(tail, batch, hkv, dim, dim, torch.bfloat16, "cuda")
        pages.exact_tail.key.normal_()
        pages.exact_tail.value.normal_()
        meta = AttentionMetadata.build([1] * batch, [ctx] * batch, tables, 16, "cuda", seq_slots=list(range(batch)))
        q = torch.randn(batch, hq, dim, device="cuda", dtype=torch.bfloat16)
        times = []
        for plan_kw in (dict(gluon=False), dict(gluon=False, separate_tail=True), dict(gluon=True)):
            plan = backend.plan(meta, bits=bits, **plan_kw)
            times.append(bt.time_graph([lambda p=plan: backend.forward(q, pages, meta, plan=p)]))
        choice = "Gluon" if backend.plan(meta, bits=bits).gluon else "Triton"
        print(f"| {batch} | {ctx} | " + " | ".join(f"{t * 1e6:.1f}" for t in times) + f" | {choice} |", flush=True)
        del pages
        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
