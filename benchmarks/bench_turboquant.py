"""TurboQuant attention (quant_turboquant plugin) vs bf16 decode, on one GPU.

One run does everything:
1. device copy bandwidth (2 GiB bf16; bytes read + written; eager copy and an
   elementwise kernel, the better one) as the memory roofline;
2. correctness at real shapes (GQA 32/8, D 128, bf16, pages of 16): the
   Triton kernel against the core's reference on the same TurboQuant pages
   (the reference dequantizes), decode with splits, multi-token decode and
   prefill, both centroid lookups;
3. a small config sweep per format (lookup, keys per step, warps) at
   B=16 and B=1, L=32k (``--no-sweep``: the backend's default plan);
4. decode timings at L = 4k / 32k / 128k, B = 1 / 4 / 16, for
   turboquant2/3/4 (best swept config), torch SDPA on contiguous bf16 K/V
   and the attention_triton plugin on bf16 pages (when importable); bytes
   per token, tokens per GiB, speed-up over SDPA, and achieved bandwidth
   over the bytes actually read as a fraction of the copy bandwidth.

Timings replay CUDA graphs that rotate over several input sets (at least
256 MB of cache touched per replay), median of 20 replays. TurboQuant pages
for timing hold random bytes (every byte pattern is valid codes) and random
positive norms; correctness uses real quantized data.

    python benchmarks/bench_turboquant.py [--quick] [--no-sweep] [--out DIR]

On the device machine the plugins are not pip-installed: put core/src and
plugins/{quant_turboquant,attention_triton}/src on PYTHONPATH; the script
registers them itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kernelplane import AttentionMetadata, AttentionRequest, KVQuantRequest, select
from kernelplane.exact_tail import ExactTail
from kernelplane.kv_cache import allocate_plain_pages
from kernelplane.reference.attention import ReferenceAttention
from kernelplane.registry import get_registry

HQ, HKV, D = 32, 8, 128
FORMATS = ("turboquant2", "turboquant3", "turboquant4")
ROTATE_BYTES = 256 * 2**20
MAX_SETS = 64
GIB = 2**30


def log(*args):
    print(*args, flush=True)


def register_plugins():
    registry = get_registry()
    names = {p.name for p in registry.plugins}
    import kernelplane_quant_turboquant.plugin as tq

    if "quant_turboquant" not in names:
        registry.register(tq, name="quant_turboquant", distribution="kernelplane-quant-turboquant")
    try:
        import kernelplane_attention_triton.plugin as at
    except ImportError:
        return False
    if "attention_triton" not in names:
        registry.register(at, name="attention_triton", distribution="kernelplane-attention-triton")
    return True


# ---------------------------------------------------------------- timing


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_graph(fns, reps=20):
    """Median seconds per call, the calls rotated inside one CUDA graph."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t) / len(fns)
    for f in fns:
        f()
    sync()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / len(fns))
    del graph
    return statistics.median(times)


def time_events(fn, reps=10):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def copy_bandwidth(device) -> dict:
    numel = 2**30 if device == "cuda" else 2**20
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 2
    if device != "cuda":
        return dict(copy=1.0, copy_eager=1.0, copy_kernel=1.0)
    deadline = time.perf_counter() + 1.0
    while time.perf_counter() < deadline:  # clocks up
        dst.copy_(src)
        sync()
    out = dict(copy_eager=2 * nbytes / time_events(lambda: dst.copy_(src)),
               copy_kernel=2 * nbytes / time_events(lambda: torch.mul(src, 1, out=dst)))
    out["copy"] = max(out.values())
    del src, dst
    torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- inputs


def request_for(fmt: str) -> AttentionRequest:
    return AttentionRequest(num_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype="bfloat16", kv_cache_format=fmt,
                            block_size=16)


def quantizer_for(fmt: str):
    return select("kv_quantizer", KVQuantRequest(format=fmt, num_kv_heads=HKV, head_dim=D, dtype="bfloat16")).implementation


def tq_backend(fmt: str):
    return select("attention", request_for(fmt), override="turboquant").implementation


def tables_for(seq_lens, block_size, first_block, gen):
    """Shuffled block tables over blocks [first_block, first_block + needed)."""
    need = [math.ceil(s / block_size) for s in seq_lens]
    perm = (torch.randperm(sum(need), generator=gen) + first_block).tolist()
    out, at = [], 0
    for n in need:
        out.append(perm[at:at + n])
        at += n
    return out, sum(need)


def random_tq_pool(quantizer, num_blocks, device, gen):
    """Pages of random codes and positive norms (timing only)."""
    pages = quantizer.allocate(num_blocks, 16, HKV, D, D, device)
    for name, t in pages.tensors.items():
        if name.endswith("codes"):
            t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, device=device))
        else:
            t.uniform_(0.5, 20.0)
    return pages


def decode_sets(batch, ctx, per_token_bytes, device, gen):
    """Metadata of several decode batches over disjoint blocks (defeats the L2)."""
    set_bytes = batch * ctx * per_token_bytes
    n_sets = max(1, min(MAX_SETS, math.ceil(ROTATE_BYTES / set_bytes))) if device == "cuda" else 1
    metas, first = [], 0
    for _ in range(n_sets):
        tables, used = tables_for([ctx] * batch, 16, first, gen)
        metas.append(AttentionMetadata.build([1] * batch, [ctx] * batch, tables, 16, device))
        first += used
    return metas, first


# ---------------------------------------------------------------- correctness


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check_correctness(device, gen, quick):
    """Kernel vs reference on the same pages; returns rows and the lookups that passed."""
    rows = []
    scale = 1 if not quick else 32
    lookups = (3, 2, 1) if device == "cuda" else (3, 1)
    cases = [
        ("decode B4 ragged", [1] * 4, [8192 // scale, 3000 // scale, 17, 4096 // scale], {}),
        ("multi-token decode (3 drafts)", [4, 4], [5000 // scale, 700 // scale], {}),
        ("prefill + chunked", [1000 // scale, 300 // scale, 1], [1000 // scale, 2000 // scale, 600 // scale], {}),
    ]
    for fmt in FORMATS:
        quantizer = quantizer_for(fmt)
        backend = tq_backend(fmt)
        request = request_for(fmt)
        for name, qlens, slens, plan_kw in cases:
            tables, used = tables_for(slens, 16, 0, gen)
            pages = random_tq_pool(quantizer, used + 2, device, gen)  # garbage in unwritten slots
            written = AttentionMetadata.build(slens, slens, tables, 16, device)
            key = torch.randn(sum(slens), HKV, D, device=device, dtype=torch.bfloat16) * 3
            value = torch.randn(sum(slens), HKV, D, device=device, dtype=torch.bfloat16)
            quantizer.write(pages, key, value, written.slot_mapping)
            meta = AttentionMetadata.build(qlens, slens, tables, 16, device)
            query = torch.randn(sum(qlens), HQ, D, device=device, dtype=torch.bfloat16)
            ref = ReferenceAttention(request).forward(query.float(), pages, meta)
            for lookup in lookups:
                if lookup == 3 and fmt != "turboquant2":
                    continue  # the cubic decoder is for 2-bit codes
                plan = backend.plan(meta, lookup=lookup, **plan_kw)
                try:
                    out = backend.forward(query, pages, meta, plan=plan)
                    sync()
                    err = rel_err(out.float(), ref)
                    ok = bool(torch.isfinite(out).all()) and err < 1e-2
                except Exception as exc:
                    err, ok = float("nan"), False
                    log(f"    {type(exc).__name__}: {str(exc)[-1500:]}")
                rows.append(dict(format=fmt, case=name, lookup=lookup, splits=plan.splits, rel_err=err, ok=ok))
                log(f"  check {fmt:12s} {name:30s} lookup={lookup} splits={plan.splits:3d} rel err {err:.2e} "
                    f"{'ok' if ok else 'FAIL'}")
            del pages, key, value
    passed = [lk for lk in lookups if all(r["ok"] for r in rows if r["lookup"] == lk)]
    return rows, passed


# ---------------------------------------------------------------- timing runs

def sweep_configs(lookups, fmt):
    """The cubic decoder (2 bits) and PTX lookups over tile shapes, and the portable
    select tree at one shape for comparison."""
    configs = []
    if 3 in lookups and fmt == "turboquant2":
        configs += [dict(lookup=3, block_n=bn, num_warps=4, num_stages=s) for bn in (64, 128) for s in (2, 3)]
        configs += [dict(lookup=3, block_n=bn, num_warps=w, num_stages=3) for bn, w in ((256, 4), (128, 8), (256, 8))]
        configs += [dict(lookup=3, block_n=128, num_warps=4, num_stages=3, programs_per_sm=p) for p in (3, 4)]
        configs.append(dict(lookup=3, block_n=128, num_warps=4, num_stages=3, rotated_query=True))
    if 2 in lookups:
        configs += [dict(lookup=2, block_n=bn, num_warps=w) for bn in (64, 128) for w in (2, 4, 8)]
        configs.append(dict(lookup=2, block_n=64, num_warps=4, num_stages=3))
        configs.append(dict(lookup=2, block_n=64, num_warps=4, rotated_query=True))
    configs.append(dict(lookup=1, block_n=64, num_warps=4))
    return configs


def time_tq(fmt, batch, ctx, device, gen, configs):
    """{config index: seconds} for one shape; the pool is shared by all configs."""
    quantizer = quantizer_for(fmt)
    backend = tq_backend(fmt)
    per_token = quantizer.bytes_per_token(HKV, D, D)
    metas, blocks = decode_sets(batch, ctx, per_token, device, gen)
    pages = random_tq_pool(quantizer, blocks, device, gen)
    query = torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16)
    out = {}
    for i, cfg in enumerate(configs):
        cfg = dict(cfg)
        tail = cfg.pop("exact_tail", 0)
        run_metas, pages.exact_tail = metas, None
        if tail:  # every sequence in its own slot, the tail read beside the codes
            pages.exact_tail = ExactTail.allocate(tail, batch, HKV, D, D, torch.bfloat16, device)
            pages.exact_tail.key.normal_()
            pages.exact_tail.value.normal_()
            slots = torch.arange(batch, dtype=torch.int32, device=device)
            run_metas = [dataclasses.replace(m, seq_slots=slots) for m in metas]
        plans = [backend.plan(m, **cfg) for m in run_metas]
        fns = [lambda m=m, p=p: backend.forward(query, pages, m, plan=p) for m, p in zip(run_metas, plans)]
        try:
            out[i] = (time_graph(fns), plans[0].splits)
        except Exception as exc:  # a config that does not fit this GPU
            log(f"    config {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
    del pages
    torch.cuda.empty_cache() if device == "cuda" else None
    return out, per_token * batch * ctx


def time_sdpa(batch, ctx, device):
    per_set = batch * ctx * HKV * D * 2 * 2
    n_sets = max(1, min(MAX_SETS, math.ceil(ROTATE_BYTES / per_set))) if device == "cuda" else 1
    ks = [torch.randn(batch, HKV, ctx, D, device=device, dtype=torch.bfloat16) for _ in range(n_sets)]
    vs = [torch.randn(batch, HKV, ctx, D, device=device, dtype=torch.bfloat16) for _ in range(n_sets)]
    q = torch.randn(batch, HQ, 1, D, device=device, dtype=torch.bfloat16)
    fns = [lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True) for k, v in zip(ks, vs)]
    t = time_graph(fns)
    del ks, vs
    torch.cuda.empty_cache() if device == "cuda" else None
    return t


def time_triton_bf16(batch, ctx, device, gen):
    request = AttentionRequest(num_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype="bfloat16", block_size=16)
    backend = select("attention", request, override="triton").implementation
    metas, blocks = decode_sets(batch, ctx, HKV * D * 4, device, gen)
    pages = allocate_plain_pages(blocks, 16, HKV, D, D, torch.bfloat16, device)
    for t in pages.tensors.values():
        t.normal_()
    query = torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16)
    t = time_graph([lambda m=m: backend.forward(query, pages, m) for m in metas])
    del pages
    torch.cuda.empty_cache() if device == "cuda" else None
    return t


def sweep(device, gen, quick, lookups):
    """Best config per format, judged on the sum of B=16 and B=1 times at L=32k."""
    ctx = 32768 if not quick else 512
    best = {}
    rows = []
    for fmt in FORMATS:
        configs = sweep_configs(lookups, fmt)
        totals = {}
        for batch in ((16, 1) if device == "cuda" else (1,)):
            times, nbytes = time_tq(fmt, batch, ctx, device, gen, configs)
            for i, (t, splits) in times.items():
                totals[i] = totals.get(i, 0.0) + t
                rows.append(dict(format=fmt, batch=batch, ctx=ctx, splits=splits, **configs[i], us=t * 1e6,
                                 tb_s=nbytes / t / 1e12))
        ranked = sorted(totals, key=totals.get)
        best[fmt] = configs[ranked[0]]
        log(f"  sweep {fmt}: best {configs[ranked[0]]} ({totals[ranked[0]] * 1e6:.1f} us for B16+B1), "
            f"worst {configs[ranked[-1]]} ({totals[ranked[-1]] * 1e6:.1f} us)")
    return best, rows


def bench_decode(device, gen, copy_bw, best, have_triton, quick):
    contexts = (4096, 32768, 131072) if not quick else ((1024, 4096) if device == "cuda" else (300,))
    batches = (1, 4, 16) if not quick else (1, 2)
    rows = []
    for ctx in contexts:
        for batch in batches if device == "cuda" else batches[:1]:
            bf16_bytes = batch * ctx * HKV * D * 4
            row = dict(batch=batch, ctx=ctx, sdpa_us=time_sdpa(batch, ctx, device) * 1e6)
            if have_triton:
                row["triton_bf16_us"] = time_triton_bf16(batch, ctx, device, gen) * 1e6
            row["sdpa_tb_s"] = bf16_bytes / (row["sdpa_us"] * 1e-6) / 1e12
            for fmt in FORMATS:
                times, nbytes = time_tq(fmt, batch, ctx, device, gen, [best[fmt]])
                t, splits = times[0]
                row[f"{fmt}_us"] = t * 1e6
                row[f"{fmt}_splits"] = splits
                row[f"{fmt}_tb_s"] = nbytes / t / 1e12
                row[f"{fmt}_roof"] = nbytes / t / copy_bw
                row[f"{fmt}_speedup"] = row["sdpa_us"] / row[f"{fmt}_us"]
            rows.append(row)
            log("  " + format_decode_row(row, have_triton))
    return rows


def format_decode_row(r, have_triton):
    cells = [f"| {r['batch']} | {r['ctx'] // 1024}k | {r['sdpa_us']:.1f} ({r['sdpa_tb_s']:.2f} TB/s)"]
    if have_triton:
        cells.append(f" {r['triton_bf16_us']:.1f}")
    for fmt in FORMATS:
        cells.append(f" {r[f'{fmt}_us']:.1f} ({r[f'{fmt}_speedup']:.2f}x, {r[f'{fmt}_roof'] * 100:.0f} %)")
    return " |".join(cells) + " |"


def markdown(env, roofs, checks, best, sweep_rows, decode, have_triton):
    lines = [f"Device: {env['device']}; {env['date']}; torch {env['torch']}, triton {env['triton']}.",
             f"Copy bandwidth (2 GiB bf16, read + written; eager copy {roofs['copy_eager'] / 1e12:.2f}, "
             f"elementwise kernel {roofs['copy_kernel'] / 1e12:.2f} TB/s): **{roofs['copy'] / 1e12:.2f} TB/s**.", ""]
    lines += ["## Bytes per token (one layer, 8 KV heads, D 128, K + V, norms included)", "",
              "| format | bytes/token | tokens per GiB | vs bf16 |", "|---|---|---|---|"]
    bf16 = HKV * D * 4
    lines.append(f"| bfloat16 | {bf16} | {GIB // bf16:,} | 1.00x |")
    for fmt in FORMATS:
        b = quantizer_for(fmt).bytes_per_token(HKV, D, D)
        lines.append(f"| {fmt} | {b:g} | {int(GIB // b):,} | {bf16 / b:.2f}x |")
    lines += ["", "## Correctness (Triton kernel vs the reference on the same pages, bf16 queries)", "",
              "| format | case | lookup | splits | rel. error |", "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['format']} | {c['case']} | {c['lookup']} | {c['splits']} | "
                     f"{c['rel_err']:.2e}{'' if c['ok'] else ' FAIL'} |")
    lines += ["", "## Chosen configs (sweep at L=32k, B=16 and B=1)", ""]
    for fmt, cfg in best.items():
        lines.append(f"- {fmt}: {cfg}")
    lines += ["", "## Decode, Hq 32 / Hkv 8, D 128, pages of 16 (µs; speed-up over SDPA bf16; % of copy bandwidth "
              "for the bytes read)", ""]
    head = "| B | L | SDPA bf16 contiguous |" + (" triton bf16 paged |" if have_triton else "")
    head += "".join(f" {fmt} |" for fmt in FORMATS)
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    lines += [format_decode_row(r, have_triton) for r in decode]
    lines += ["", "## Sweep rows", "", "| format | B | L | lookup | keys/step | warps | stages | programs/SM | "
              "query rotated before | splits | µs | TB/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sweep_rows:
        lines.append(f"| {r['format']} | {r['batch']} | {r['ctx']} | {r['lookup']} | {r['block_n']} | {r['num_warps']} "
                     f"| {r.get('num_stages', 2)} | {r.get('programs_per_sm', 2)} | {r.get('rotated_query', False)} "
                     f"| {r['splits']} | {r['us']:.1f} | {r['tb_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (also what the CPU smoke run uses)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--no-sweep", action="store_true", help="time the backend's default plan only (what the engine runs)")
    ap.add_argument("--rotated-query", action="store_true",
                    help="with --no-sweep: the default plan with the queries rotated before the kernel")
    ap.add_argument("--exact-tail", type=int, default=0, metavar="N",
                    help="with --no-sweep: every sequence also reads its first and latest N tokens from an exact "
                         "tail (what the engine does, N=64)")
    ap.add_argument("--separate-tail", action="store_true",
                    help="with --exact-tail: the tail read by a second launch (LaunchPlan.separate_tail)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    have_triton = register_plugins()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    env = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
               date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
               triton=__import__("triton").__version__)
    log(f"{env}")
    t0 = time.time()
    roofs = copy_bandwidth(device)
    log(f"copy bandwidth {roofs['copy'] / 1e12:.2f} TB/s ({time.time() - t0:.0f}s)")
    os.makedirs(args.out, exist_ok=True)
    results = dict(env=env, roofs=roofs)

    def save():
        with open(os.path.join(args.out, "turboquant_results.json"), "w") as f:
            json.dump(results, f, indent=1)

    results["checks"], lookups = check_correctness(device, gen, quick)
    save()
    log(f"correctness done, lookups that passed: {lookups} ({time.time() - t0:.0f}s)")
    if args.no_sweep:
        from kernelplane_quant_turboquant.quantizer import FORMAT_BITS

        results["best"] = {fmt: dict(bits=FORMAT_BITS[fmt], rotated_query=args.rotated_query,
                                     **({"exact_tail": args.exact_tail} if args.exact_tail else {}),
                                     **({"separate_tail": True} if args.separate_tail else {}))
                           for fmt in FORMATS}
        results["sweep"] = []
    else:
        results["best"], results["sweep"] = sweep(device, gen, quick, lookups)
    save()
    log(f"sweep done ({time.time() - t0:.0f}s)")
    results["decode"] = bench_decode(device, gen, roofs["copy"], results["best"], have_triton, quick)
    save()
    log(f"decode done ({time.time() - t0:.0f}s)")
    md = markdown(env, roofs, results["checks"], results["best"], results["sweep"], results["decode"], have_triton)
    with open(os.path.join(args.out, "turboquant_results.md"), "w") as f:
        f.write(md)
    log(md)
    return 0 if lookups else 1


if __name__ == "__main__":
    sys.exit(main())
