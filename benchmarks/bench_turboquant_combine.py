"""The split combine alone (``backend.combine_splits``): query heads per program, column
programs (each rotating back a share of the output columns) and warps, at decode shapes
of Hq 32, head dim 128, on a GPU. Each time is one launch of 20 in a CUDA graph; "max
diff" is against the shape's first variant (bfloat16 outputs of about 10, whose step
there is 0.06). It chose ``backend._combine_column_programs``.

    python benchmarks/bench_turboquant_combine.py
"""
from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_turboquant as bt  # noqa: E402
from kernelplane_quant_turboquant.backend import combine_splits  # noqa: E402

HQ, D = 32, 128
# (tokens, splits): the Gluon plan's splits for batch 1, 4, 8, 16 at 32k tokens on an H200 when the rule
# was chosen (2026-12-03, two rounds; one round now gives 49, 24 and 12 at batch 4, 8 and 16).
SHAPES = [(1, 128), (4, 94), (8, 47), (16, 24)]


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a GPU")
        return 1
    print("| tokens | splits | heads/program | column programs | warps | µs | max diff |")
    print("|---|---|---|---|---|---|---|")
    for tokens, splits in SHAPES:
        partial = torch.randn(tokens, HQ, splits, D, device="cuda")
        lse = torch.randn(tokens, HQ, splits, device="cuda") * 3
        o_hi = torch.randn(D, D, device="cuda").to(torch.bfloat16)
        o_lo = (torch.randn(D, D, device="cuda") * 1e-3).to(torch.bfloat16)
        first = None
        for heads, columns, warps in itertools.product((1, 2, 4), (1, 2, 4), (4, 8)):
            out = torch.empty(tokens, HQ, D, device="cuda", dtype=torch.bfloat16)
            t = bt.time_graph([lambda: combine_splits(partial, lse, out, o_hi, o_lo, splits, heads, columns,
                                                      num_warps=warps)] * 20)
            first = out.float() if first is None else first
            print(f"| {tokens} | {splits} | {heads} | {columns} | {warps} | {t * 1e6:.2f} | "
                  f"{(out.float() - first).abs().max().item():.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
