"""Triton paged attention vs the reference and torch SDPA, on one GPU.

What it does, in one run:
1. measures the device copy bandwidth (torch copy of a large tensor, bytes
   read + written) as the memory roofline;
2. checks the Triton backend against the core's reference at real shapes
   (GQA 32/8, head dim 128, bf16, pages of 16 and 64; decode, prefill, a
   chunked-prefill mix);
3. times decode over batch x context and prefill over length for the Triton
   backend, the reference and torch SDPA on contiguous K/V, and prints the
   achieved KV bandwidth as a fraction of the copy bandwidth and prefill
   TFLOP/s against SDPA's flash path;
4. with --sweep, also times alternative tile configs and split targets.

Results go to --out (default $OUT or ./bench_out): results.md, results.json,
attention.png.

    python benchmarks/bench_attention.py [--sweep] [--quick]

On the project's device machine the plugin is not pip-installed: put
core/src and plugins/attention_triton/src on PYTHONPATH; the script registers
the plugin itself when no entry point did.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kernelplane import AttentionMetadata, AttentionRequest, select
from kernelplane.kv_cache import allocate_plain_pages
from kernelplane.reference.attention import ReferenceAttention
from kernelplane.registry import get_registry

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
ROTATE_BYTES = 512 * 2**20  # rotate input sets until this many KV bytes: defeats the 50 MB L2
LAYOUT = random.Random(0)  # block shuffles and ragged lengths


def log(*args):
    print(*args, flush=True)


def ensure_plugin():
    registry = get_registry()
    if not any(p.name == "attention_triton" for p in registry.plugins):
        import kernelplane_attention_triton.plugin as plugin

        registry.register(plugin, name="attention_triton", distribution="kernelplane-attention-triton")


def triton_backend(block_size: int, **request_fields):
    request = AttentionRequest(num_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype="bfloat16",
                               block_size=block_size, **request_fields)
    sel = select("attention", request, override="triton")
    return request, sel.implementation


# ---------------------------------------------------------------- inputs


def make_batch(query_lens, seq_lens, block_size, device, pool=None, gen=None):
    """Random paged cache (shuffled blocks), metadata and queries."""
    need = [math.ceil(s / block_size) for s in seq_lens]
    total = sum(need)
    if pool is None:
        pool = allocate_plain_pages(total, block_size, HKV, D, D, DTYPE, device)
        for t in pool.tensors.values():
            t.normal_(generator=gen)
        offset = 0
    else:
        pool, offset = pool
    order = [offset + i for i in LAYOUT.sample(range(total), total)]
    tables, at = [], 0
    for n in need:
        tables.append(order[at:at + n])
        at += n
    meta = AttentionMetadata.build(list(query_lens), list(seq_lens), tables, block_size, device)
    query = torch.randn(sum(query_lens), HQ, D, device=device, dtype=DTYPE, generator=gen)
    return pool, meta, query


def rotating_batches(query_lens, seq_lens, block_size, device, gen):
    """Several batches over disjoint parts of one page pool, enough to spill the L2."""
    per_set = sum(math.ceil(s / block_size) for s in seq_lens)
    set_bytes = per_set * block_size * HKV * D * 2 * DTYPE.itemsize
    n_sets = max(1, min(16, math.ceil(ROTATE_BYTES / set_bytes)))
    pool = allocate_plain_pages(per_set * n_sets, block_size, HKV, D, D, DTYPE, device)
    for t in pool.tensors.values():
        t.normal_(generator=gen)
    sets = [make_batch(query_lens, seq_lens, block_size, device, pool=(pool, i * per_set), gen=gen)[1:]
            for i in range(n_sets)]
    return pool, sets


# ---------------------------------------------------------------- timing


def time_graph(fns, reps=30):
    """Median time of one call, fns rotated inside one captured CUDA graph."""
    if not torch.cuda.is_available():  # CPU smoke run: just exercise the code
        return time_eager(lambda: [f() for f in fns], reps=1) / len(fns)
    for f in fns:
        f()
    torch.cuda.synchronize()
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
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    del graph
    return statistics.median(times) * 1e-3  # seconds


def _empty_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_eager(fn, reps=3):
    fn()
    _sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_events(fn, reps=20):
    """Median of event-timed eager calls (no graph)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def memory_rooflines(device, numel=2**30) -> dict:
    """Bytes/s of a 2 GiB bf16 copy (read + write) three ways, and of a pure read (a sum)."""
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    if not src.is_cuda:  # CPU smoke run
        t = time_eager(lambda: dst.copy_(src), reps=1)
        return dict(copy=2 * nbytes / t, copy_eager=2 * nbytes / t, copy_graph=2 * nbytes / t,
                    copy_kernel=2 * nbytes / t, read=nbytes / t)
    deadline = time.perf_counter() + 1.0  # bring the clocks up first
    while time.perf_counter() < deadline:
        dst.copy_(src)
        torch.cuda.synchronize()
    out = dict(
        copy_eager=2 * nbytes / time_events(lambda: dst.copy_(src)),
        copy_graph=2 * nbytes / time_graph([lambda: dst.copy_(src)], reps=20),
        copy_kernel=2 * nbytes / time_events(lambda: torch.mul(src, 1, out=dst)),
        read=nbytes / time_events(lambda: src.sum(dtype=torch.float32)),
    )
    out["copy"] = max(out["copy_eager"], out["copy_graph"], out["copy_kernel"])
    del src, dst
    _empty_cache()
    return out


# ---------------------------------------------------------------- correctness


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check_correctness(device, gen, quick, max_len=8192):
    """Real shapes on the GPU; ``max_len`` shrinks them for the CPU smoke run."""
    rows = []
    n = lambda x: max(1, x * max_len // 8192)  # noqa: E731
    cases = [
        ("decode ragged B=64", 16, [1] * 64, None),
        ("decode ragged B=64", 64, [1] * 64, None),
        ("decode split B=4", 16, [1] * 4, None),
        ("prefill B=1", 16, [n(4096)], [n(4096)]),
        ("prefill B=1", 64, [n(4096)], [n(4096)]),
        ("chunked prefill + decode mix", 16, [n(512), 1, 1, n(300), 4, 4], [n(3000), max_len, 17, n(300), n(4000), 61]),
        ("sliding window mix", 64, [n(2048), 1, 1], [n(2048), max_len, n(3000)]),
    ]
    if quick:
        cases = cases[:1] + cases[3:4]
    for name, page, q_lens, s_lens in cases:
        if s_lens is None:
            s_lens = [max_len] + [LAYOUT.randint(1, max_len) for _ in q_lens[1:]]
        window = n(1024) if "window" in name else None
        request, backend = triton_backend(page, sliding_window=window)
        pages, meta, query = make_batch(q_lens, s_lens, page, device, gen=gen)
        out = backend.forward(query, pages, meta)
        ref = ReferenceAttention(request).forward(query.float(), pages, meta)
        err = rel_err(out, ref)
        plan = backend.plan(query.shape[0], meta, page)
        ok = bool(torch.isfinite(out).all()) and err < 2e-2
        rows.append(dict(case=name, page=page, rel_err=err, splits=plan.splits, ok=ok))
        name = f"{name} L<={max(s_lens)}" + (f" window {window}" if window else "")
        rows[-1]["case"] = name
        log(f"  {'ok ' if ok else 'BAD'} {name:44s} page {page:3d}  rel err {err:.2e}  splits {plan.splits}")
        del pages, meta, query, out, ref
        _empty_cache()
    return rows


# ---------------------------------------------------------------- benchmarks


def sdpa_decode_inputs(batch, ctx, n_sets, device, gen):
    sets = []
    for _ in range(n_sets):
        q = torch.randn(batch, HQ, 1, D, device=device, dtype=DTYPE, generator=gen)
        k = torch.randn(batch, HKV, ctx, D, device=device, dtype=DTYPE, generator=gen)
        v = torch.randn(batch, HKV, ctx, D, device=device, dtype=DTYPE, generator=gen)
        sets.append((q, k, v))
    return sets


def bench_decode(device, gen, copy_bw, batches, contexts, pages, with_reference=True):
    rows = []
    for page in pages:
        request, backend = triton_backend(page)
        for batch in batches:
            for ctx in contexts:
                pool, sets = rotating_batches([1] * batch, [ctx] * batch, page, device, gen)
                kv_bytes = batch * ctx * HKV * 2 * D * DTYPE.itemsize
                plan = backend.plan(batch, sets[0][0], page)
                t_triton = time_graph([lambda m=m, q=q: backend.forward(q, pool, m) for m, q in sets])
                row = dict(kind="decode", page=page, batch=batch, context=ctx, kv_mb=kv_bytes / 1e6,
                           splits=plan.splits, triton_us=t_triton * 1e6, triton_tbs=kv_bytes / t_triton / 1e12,
                           triton_frac=kv_bytes / t_triton / copy_bw)
                del pool, sets
                _empty_cache()
                sdpa_sets = sdpa_decode_inputs(batch, ctx, len_sets(kv_bytes), device, gen)
                t_sdpa = time_graph([lambda s=s: F.scaled_dot_product_attention(*s, enable_gqa=True)
                                     for s in sdpa_sets])
                row.update(sdpa_us=t_sdpa * 1e6, sdpa_tbs=kv_bytes / t_sdpa / 1e12, sdpa_frac=kv_bytes / t_sdpa / copy_bw)
                del sdpa_sets
                _empty_cache()
                # The reference repeats K/V to every query head in float32: skip where that would not fit.
                if with_reference and page == pages[0] and batch * ctx * HQ * D * 4 * 2 <= 24e9:
                    pages_ref, meta, query = make_batch([1] * batch, [ctx] * batch, page, device, gen=gen)
                    ref = ReferenceAttention(request)
                    row["ref_us"] = time_eager(lambda: ref.forward(query, pages_ref, meta)) * 1e6
                    del pages_ref, meta, query
                    _empty_cache()
                rows.append(row)
                log(f"  decode page {page:3d} B {batch:3d} L {ctx:6d}: triton {row['triton_us']:8.1f} us "
                    f"{row['triton_tbs']:.2f} TB/s ({100 * row['triton_frac']:.0f}% of copy, {plan.splits} splits)  "
                    f"sdpa {row['sdpa_us']:8.1f} us ({100 * row['sdpa_frac']:.0f}%)"
                    + (f"  ref {row['ref_us']:.0f} us" if "ref_us" in row else ""))
    return rows


def len_sets(set_bytes):
    return max(1, min(16, math.ceil(ROTATE_BYTES / set_bytes)))


def causal_flops(seq_len):
    return 4 * HQ * D * seq_len * (seq_len + 1) / 2


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION if q.is_cuda else SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def bench_prefill(device, gen, lengths, pages, batch=1, with_reference=True):
    rows = []
    for page in pages:
        request, backend = triton_backend(page)
        for length in lengths:
            pool, meta, query = make_batch([length] * batch, [length] * batch, page, device, gen=gen)
            t_triton = time_graph([lambda: backend.forward(query, pool, meta)], reps=10)
            flops = batch * causal_flops(length)
            row = dict(kind="prefill", page=page, batch=batch, length=length,
                       triton_ms=t_triton * 1e3, triton_tflops=flops / t_triton / 1e12)
            q = torch.randn(batch, HQ, length, D, device=device, dtype=DTYPE, generator=gen)
            k = torch.randn(batch, HKV, length, D, device=device, dtype=DTYPE, generator=gen)
            v = torch.randn(batch, HKV, length, D, device=device, dtype=DTYPE, generator=gen)
            try:
                t_sdpa = time_graph([lambda: sdpa_flash(q, k, v)], reps=10)
                row["sdpa_note"] = "flash, enable_gqa"
            except RuntimeError:  # flash without GQA support: repeat K/V heads outside the timing
                k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
                t_sdpa = time_graph([lambda: sdpa_flash(q, k, v)], reps=10)
                row["sdpa_note"] = "flash, repeated KV heads"
            row.update(sdpa_ms=t_sdpa * 1e3, sdpa_tflops=flops / t_sdpa / 1e12, ratio=t_sdpa / t_triton)
            if with_reference and page == pages[0] and length <= 4096:
                ref = ReferenceAttention(request)
                row["ref_ms"] = time_eager(lambda: ref.forward(query, pool, meta), reps=2) * 1e3
            rows.append(row)
            log(f"  prefill page {page:3d} B {batch} L {length:5d}: triton {row['triton_ms']:.3f} ms "
                f"{row['triton_tflops']:.0f} TFLOP/s  sdpa flash {row['sdpa_ms']:.3f} ms {row['sdpa_tflops']:.0f} TFLOP/s"
                f"  ratio {100 * row['ratio']:.0f}%" + (f"  ref {row['ref_ms']:.1f} ms" if "ref_ms" in row else ""))
            del pool, meta, query, q, k, v
            _empty_cache()
    return rows


def sweep(device, gen, copy_bw, scale=1.0):
    """Alternative tile configs and split targets at the shapes that matter."""
    from kernelplane_attention_triton.configs import TileConfig

    rows = []
    decode_tiles = [TileConfig(16, 64, 4, 2), TileConfig(16, 64, 2, 2), TileConfig(16, 128, 4, 2),
                    TileConfig(16, 32, 4, 2), TileConfig(16, 64, 4, 1)]
    shapes = [(16, 32, 4096), (16, 64, 8192), (64, 32, 4096), (16, 8, 8192), (16, 1, 16384)]
    for page, batch, ctx in [(p, b, max(16, int(c * scale))) for p, b, c in shapes]:
        _, backend = triton_backend(page)
        pool, sets = rotating_batches([1] * batch, [ctx] * batch, page, device, gen)
        kv_bytes = batch * ctx * HKV * 2 * D * DTYPE.itemsize
        default = backend.plan(batch, sets[0][0], page).tiles
        trials = [(tiles, 2.0) for tiles in decode_tiles] + [(default, pps) for pps in (1.0, 4.0)]
        for tiles, pps in trials:
            plan = backend.plan(batch, sets[0][0], page, tiles=tiles, programs_per_sm=pps)
            try:
                t = time_graph([lambda m=m, q=q: backend.forward(q, pool, m, plan=plan) for m, q in sets], reps=15)
            except Exception as exc:  # a config that does not compile (e.g. out of shared memory)
                log(f"  sweep decode page {page} B {batch} L {ctx} {tiles}: failed {type(exc).__name__}")
                continue
            rows.append(dict(kind="decode", page=page, batch=batch, context=ctx, tiles=str(tiles),
                             programs_per_sm=pps, splits=plan.splits, us=t * 1e6, frac=kv_bytes / t / copy_bw))
            log(f"  sweep decode page {page:3d} B {batch:3d} L {ctx}: bn {tiles.block_n:3d} w {tiles.num_warps} "
                f"st {tiles.num_stages} pps {pps} splits {plan.splits:2d}: {t * 1e6:8.1f} us "
                f"{100 * kv_bytes / t / copy_bw:.0f}%")
        best = min((r for r in rows if r["kind"] == "decode" and (r["page"], r["batch"], r["context"]) == (page, batch, ctx)),
                   key=lambda r: r["us"], default=None)
        if best:
            log(f"  best decode page {page} B {batch} L {ctx}: {best['tiles']} pps {best['programs_per_sm']} "
                f"splits {best['splits']}: {best['us']:.1f} us {100 * best['frac']:.0f}%")
        del pool, sets
        _empty_cache()

    prefill_tiles = [TileConfig(128, 128, 8, 3), TileConfig(128, 128, 8, 2), TileConfig(128, 64, 8, 3),
                     TileConfig(128, 128, 4, 3), TileConfig(64, 128, 4, 3)]
    for page in (16, 64):
        _, backend = triton_backend(page)
        length = max(16, int(4096 * scale))
        pool, meta, query = make_batch([length], [length], page, device, gen=gen)
        for tiles in prefill_tiles:
            plan = backend.plan(length, meta, page, tiles=tiles)
            try:
                t = time_graph([lambda: backend.forward(query, pool, meta, plan=plan)], reps=10)
            except Exception as exc:
                log(f"  sweep prefill page {page} {tiles}: failed {type(exc).__name__}: {str(exc)[:100]}")
                continue
            tflops = causal_flops(length) / t / 1e12
            rows.append(dict(kind="prefill", page=page, length=length, tiles=str(tiles), ms=t * 1e3, tflops=tflops))
            log(f"  sweep prefill page {page:3d} L {length}: bm {tiles.block_m} bn {tiles.block_n} w {tiles.num_warps} "
                f"st {tiles.num_stages}: {t * 1e3:.3f} ms {tflops:.0f} TFLOP/s")
        best = min((r for r in rows if r["kind"] == "prefill" and r["page"] == page), key=lambda r: r["ms"], default=None)
        if best:
            log(f"  best prefill page {page} L {length}: {best['tiles']}: {best['ms']:.3f} ms {best['tflops']:.0f} TFLOP/s")
        del pool, meta, query
        _empty_cache()
    return rows


# ---------------------------------------------------------------- report


def markdown(env, roofs, correctness, decode, prefill):
    copy_bw, read_bw = roofs["copy"], roofs["read"]
    lines = [f"Device: {env['device']}; {env['date']}; torch {env['torch']}, triton {env['triton']}.",
             f"Copy bandwidth (2 GiB bf16, bytes read + written, best of torch copy eager "
             f"{roofs['copy_eager'] / 1e12:.2f} / in a CUDA graph {roofs['copy_graph'] / 1e12:.2f} / as a kernel "
             f"{roofs['copy_kernel'] / 1e12:.2f}): **{copy_bw / 1e12:.2f} TB/s**. Pure read (torch sum of the same "
             f"tensor): {read_bw / 1e12:.2f} TB/s.",
             f"Shapes: {HQ} query heads, {HKV} KV heads, head dim {D}, bf16, causal.", "",
             "Correctness against the core reference (float32):", "",
             "| case | page | rel. error | splits | ok |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['page']} | {r['rel_err']:.2e} | {r['splits']} | {'yes' if r['ok'] else 'NO'} |"
              for r in correctness]
    lines += ["", "Decode (one token per sequence, every sequence at the full context; KV bandwidth = K+V bytes "
                  "read / time; % of the copy bandwidth above):", "",
              "| page | B | L | KV MB | triton µs | triton TB/s | % copy | % read | splits | SDPA µs | SDPA % copy | "
              "triton/SDPA speed | reference µs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in decode:
        ref = f"{r['ref_us']:.0f}" if "ref_us" in r else "–"
        lines.append(f"| {r['page']} | {r['batch']} | {r['context']} | {r['kv_mb']:.0f} | {r['triton_us']:.1f} | "
                     f"{r['triton_tbs']:.2f} | {100 * r['triton_frac']:.0f}% | {100 * r['triton_tbs'] * 1e12 / read_bw:.0f}% | "
                     f"{r['splits']} | {r['sdpa_us']:.1f} | "
                     f"{100 * r['sdpa_frac']:.0f}% | {r['sdpa_us'] / r['triton_us']:.2f}× | {ref} |")
    lines += ["", "Prefill (causal, FLOPs = 4·Hq·D·L(L+1)/2 per sequence; SDPA forced to its flash path):", "",
              "| page | B | L | triton ms | triton TFLOP/s | SDPA flash ms | SDPA TFLOP/s | triton / SDPA | reference ms |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in prefill:
        ref = f"{r['ref_ms']:.1f}" if "ref_ms" in r else "–"
        lines.append(f"| {r['page']} | {r['batch']} | {r['length']} | {r['triton_ms']:.3f} | {r['triton_tflops']:.0f} | "
                     f"{r['sdpa_ms']:.3f} | {r['sdpa_tflops']:.0f} | {100 * r['ratio']:.0f}% | {ref} |")
    return "\n".join(lines) + "\n"


def plot(decode, prefill, copy_bw, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    rows = [r for r in decode if r["page"] == 16]
    labels = [f"B{r['batch']}\nL{r['context'] // 1024}k" for r in rows]
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [100 * r["triton_frac"] for r in rows], 0.4, label="triton (paged, page 16)")
    ax1.bar([i + 0.2 for i in x], [100 * r["sdpa_frac"] for r in rows], 0.4, label="torch SDPA (contiguous)")
    ax1.axhline(90, color="gray", ls="--", lw=1, label="target 90%")
    ax1.set_xticks(list(x), labels, fontsize=7)
    ax1.set_ylabel(f"% of copy bandwidth ({copy_bw / 1e12:.2f} TB/s)")
    ax1.set_title("decode: KV bandwidth")
    ax1.legend(fontsize=8)
    labels = [f"page {r['page']}\nL {r['length']}" for r in prefill]
    x = range(len(prefill))
    ax2.bar([i - 0.2 for i in x], [r["triton_tflops"] for r in prefill], 0.4, label="triton (paged)")
    ax2.bar([i + 0.2 for i in x], [r["sdpa_tflops"] for r in prefill], 0.4, label="SDPA flash (contiguous)")
    ax2.set_xticks(list(x), labels, fontsize=8)
    ax2.set_ylabel("TFLOP/s")
    ax2.set_title("causal prefill, B=1")
    ax2.legend(fontsize=8)
    fig.suptitle(f"paged attention, Hq {HQ} / Hkv {HKV}, D {D}, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument("--sweep", action="store_true", help="also sweep tile configs and split targets")
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--no-grid", action="store_true", help="skip the main grid (sweep only)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU dry run of the whole script at tiny shapes (Triton interpreter)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke)")
    os.makedirs(args.out, exist_ok=True)
    ensure_plugin()
    device = torch.device("cpu" if args.smoke else "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    import triton

    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run)",
               date=datetime.datetime.now().isoformat(timespec="seconds"),
               torch=torch.__version__, triton=triton.__version__)
    log(f"{env['device']}  {env['date']}  torch {env['torch']}  triton {env['triton']}")
    roofs = memory_rooflines(device, numel=2**20 if args.smoke else 2**30)
    copy_bw = roofs["copy"]
    log("memory rooflines (TB/s): " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in roofs.items()))
    log(f"copy bandwidth used below: {copy_bw / 1e12:.3f} TB/s (read + write; the best of the three copies)")
    results = dict(env=env, copy_bw=copy_bw, rooflines=roofs)
    max_len = 64 if args.smoke else 8192
    if args.smoke:
        global ROTATE_BYTES
        ROTATE_BYTES = 2 * 2**20

    log("correctness vs reference:")
    results["correctness"] = check_correctness(device, gen, args.quick, max_len)
    if not args.no_grid:
        log("decode:")
        batches, contexts = ([1, 32], [4096]) if args.quick else ([1, 8, 32, 64], [1024, 4096, 8192, 16384])
        long_batches, long_contexts, lengths = [32, 64], [4096, 8192], [1024, 4096, 8192]
        if args.smoke:
            batches, contexts, long_batches, long_contexts, lengths = [1, 2], [48, 100], [2], [64], [40, 70]
        results["decode"] = bench_decode(device, gen, copy_bw, batches, contexts, [16])
        _write(args.out, results)
        results["decode"] += bench_decode(device, gen, copy_bw, long_batches, long_contexts, [64], with_reference=False)
        _write(args.out, results)
        log("prefill:")
        results["prefill"] = bench_prefill(device, gen, lengths[:1] if args.quick else lengths, [16, 64])
        md = markdown(env, roofs, results["correctness"], results["decode"], results["prefill"])
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(md)
        plot(results["decode"], results["prefill"], copy_bw, os.path.join(args.out, "attention.png"))
        log("")
        log(md)
    if args.sweep:
        log("sweep:")
        results["sweep"] = sweep(device, gen, copy_bw, scale=max_len / 8192)
        _write(args.out, results)
    roofs_end = memory_rooflines(device, numel=2**20 if args.smoke else 2**30)
    log("memory rooflines again at the end (TB/s): " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in roofs_end.items()))
    results["rooflines_end"] = roofs_end
    _write(args.out, results)
    if not all(r["ok"] for r in results["correctness"]):
        sys.exit("correctness check FAILED")


def _write(out, results):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
