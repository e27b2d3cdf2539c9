"""The split combine alone (``kernels.combine_splits_kernel``): heads per program, column
programs (``OUT_COLS``) and warps at decode shapes of Hq 32, head dim 128, on a GPU. Each
time is one launch of 20 in a CUDA graph; "max diff" is against the first variant of the
shape (bfloat16 outputs). Chose ``backend._combine_column_programs``.

    python benchmarks/bench_turboquant_combine.py
"""
import sys, torch, itertools
sys.path.insert(0, "benchmarks")
import bench_turboquant as bt
from kernelplane_quant_turboquant import kernels
from kernelplane_quant_turboquant.backend import COMBINE_TILE
def p2(n): return 1 << (n - 1).bit_length()
D, HQ = 128, 32
print("| tokens | splits | heads/program | column programs | warps | split chunk | µs | max diff |")
print("|---|---|---|---|---|---|---|---|")
for tokens, splits in [(1, 128), (4, 94), (8, 47), (16, 24)]:
    part = torch.randn(tokens, HQ, splits, D, device="cuda")
    lse = torch.randn(tokens, HQ, splits, device="cuda") * 3
    o_hi = torch.randn(D, D, device="cuda").to(torch.bfloat16); o_lo = (torch.randn(D, D, device="cuda") * 1e-3).to(torch.bfloat16)
    ref = None
    for heads, colp, warps, chunk_kind in itertools.product((1, 2, 4), (1, 2, 4), (4, 8), ("tile",)):
        rows = p2(heads)
        chunk = max(1, min(p2(splits), COMBINE_TILE // (rows * D))) if chunk_kind == "tile" else p2(splits)
        if rows * chunk * D > 32768: continue
        out = torch.empty(tokens, HQ, D, device="cuda", dtype=torch.bfloat16)
        def f(out=out, heads=heads, rows=rows, chunk=chunk, warps=warps, colp=colp):
            kernels.combine_splits_kernel[(tokens, HQ // heads, colp)](
                part, lse, out, o_hi, o_lo, splits, part.stride(0), part.stride(1), part.stride(2),
                lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                GROUP=heads, BLOCK_H=rows, BLOCK_S=max(2, p2(splits)), SPLIT_CHUNK=chunk, HEAD_DIM_V=D,
                OUT_CHUNK=32, REPEAT=max(1, 16 // rows), OUT_COLS=D // colp, UPCAST=False, num_warps=warps)
        t = bt.time_graph([f] * 20)
        ref = out.float() if ref is None else ref
        print(f"| {tokens} | {splits} | {heads} | {colp} | {warps} | {chunk} | {t*1e6:.2f} | {(out.float()-ref).abs().max().item():.1e} |", flush=True)
