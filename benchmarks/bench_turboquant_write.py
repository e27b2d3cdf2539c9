"""TurboQuant quantize-on-write on a GPU: the fused Triton kernel against the PyTorch path.

For each format and shape (tokens written at once, KV heads, head dim), both
paths write the same bfloat16 K and V rows into fresh pages at shuffled
slots. Printed: bytes of codes that differ between the two (threshold ties
only), relative difference of the dequantized rows, and the time of one
write of K and V (both planes) in CUDA-graph replays, what the engine pays
per layer and step, for the PyTorch path and the fused kernel with its
rotation inside each program, as one cuBLAS product before it, and as
shipped (``write_kernel.PREROTATE_MIN_WORK`` picks by the size of the
write), and as shipped without the encoder's scale search (the default at 3
and 4 bits: 16 scaled copies of each row quantized, the best kept). The ratio column is PyTorch / shipped; the bandwidth
column counts the rows read and the codes and norms written, against the
copy bandwidth measured in the same run.

    python benchmarks/bench_turboquant_write.py
"""
from __future__ import annotations

import time

import torch

from bench_turboquant import copy_bandwidth, time_graph
from kernelplane import KVQuantRequest
from kernelplane_quant_turboquant import write_kernel
from kernelplane_quant_turboquant.quantizer import TurboQuantKVQuantizer

# (tokens, KV heads, head dim): SmolLM2 (3 x 64) from a batch-1 decode step to a 4k prefill, then 8 x 128 heads.
SHAPES = [(1, 3, 64), (64, 3, 64), (256, 3, 64), (1024, 3, 64), (4096, 3, 64),
          (1, 8, 128), (64, 8, 128), (256, 8, 128), (1024, 8, 128)]
BLOCK = 16
# (name, fused, write_kernel.PREROTATE_MIN_WORK, scale_search); "fused" keeps the shipped
# threshold; None: the format's default scale search.
VARIANTS = [("torch", False, None, None), ("rotation in kernel", True, 1 << 62, None),
            ("rotation by cuBLAS", True, 0, None), ("fused", True, write_kernel.PREROTATE_MIN_WORK, None),
            ("fused, no search", True, write_kernel.PREROTATE_MIN_WORK, 1)]


def pages_and_rows(fmt, tokens, heads, dim, fused, gen, scale_search=None):
    q = TurboQuantKVQuantizer(KVQuantRequest(format=fmt, num_kv_heads=heads, head_dim=dim, dtype="bfloat16"),
                              fused_write=fused, scale_search=scale_search)
    blocks = (tokens + BLOCK - 1) // BLOCK + 1
    pages = q.allocate(blocks, BLOCK, heads, dim, dim, "cuda")
    slots = torch.randperm(blocks * BLOCK, generator=gen)[:tokens].cuda()
    return q, pages, slots, blocks


def main() -> int:
    torch.manual_seed(0)
    bw = copy_bandwidth("cuda")["copy"]
    print(f"# {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s")
    shipped_min_work = write_kernel.PREROTATE_MIN_WORK
    print("| format | tokens | KV heads | dim | code bytes differing | dequantized rel. diff | PyTorch µs | "
          "fused, rotation in kernel µs | fused, rotation by cuBLAS µs | fused as shipped µs | "
          "shipped, no scale search µs | PyTorch / shipped | shipped % of copy bw |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for fmt in ("turboquant2", "turboquant3", "turboquant4"):
        for tokens, heads, dim in SHAPES:
            gen = torch.Generator().manual_seed(tokens * 131 + heads)
            key = (torch.randn(tokens, heads, dim, generator=gen) * 2 + 0.7).to("cuda", torch.bfloat16)
            value = torch.randn(tokens, heads, dim, generator=gen).to("cuda", torch.bfloat16)
            runs = {}
            for variant, fused, min_work, search in VARIANTS:
                write_kernel.PREROTATE_MIN_WORK = min_work
                q, pages, slots, blocks = pages_and_rows(fmt, tokens, heads, dim, fused, torch.Generator().manual_seed(5),
                                                         search)
                q.write(pages, key, value, slots)  # sets the key offset; the timed writes reuse it
                runs[variant] = (q, pages, blocks, time_graph([lambda: q.write(pages, key, value, slots)] * 10))
            write_kernel.PREROTATE_MIN_WORK = shipped_min_work
            (q0, p0, blocks, t0), (q1, p1, _, t1) = runs["torch"], runs["fused"]
            t_kernel, t_pre, t_plain = (runs[v][3] for v in ("rotation in kernel", "rotation by cuBLAS",
                                                             "fused, no search"))
            written = slots_mask(p0, slots)
            codes = [p.tensors[f"{plane}_codes"].flatten(0, 1)[written] for p in (p0, p1) for plane in ("key", "value")]
            differing = sum((a != b).sum().item() for a, b in zip(codes[:2], codes[2:]))
            total = sum(c.numel() for c in codes[:2])
            ids = torch.arange(blocks, device="cuda")
            diffs = []
            for a, b in zip(q0.dequantize(p0, ids), q1.dequantize(p1, ids)):
                a, b = a.flatten(0, 1)[written], b.flatten(0, 1)[written]
                diffs.append(((a - b).norm() / a.norm()).item())
            moved = tokens * heads * (2 * dim * 2 + 2 * (q0.key_codec.packed_bytes + 2))
            print(f"| {fmt} | {tokens} | {heads} | {dim} | {differing / total:.3%} | {max(diffs):.2e} | "
                  f"{t0 * 1e6:.1f} | {t_kernel * 1e6:.1f} | {t_pre * 1e6:.1f} | {t1 * 1e6:.1f} | {t_plain * 1e6:.1f} | "
                  f"{t0 / t1:.2f}x | "
                  f"{100 * moved / t1 / bw:.1f} % |", flush=True)
    return 0


def slots_mask(pages, slots):
    norms = pages.tensors["key_norm"]  # [blocks, block, heads]
    mask = torch.zeros(norms.shape[0] * norms.shape[1], dtype=torch.bool, device=slots.device)
    mask[slots] = True
    return mask


if __name__ == "__main__":
    raise SystemExit(main())
