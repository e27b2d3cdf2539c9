"""The ``AttentionBackend`` the provider builds: checks inputs, plans, launches.

Everything the launch depends on is known on the host (tensor shapes and the
metadata's ``max_query_len`` / ``max_seq_len``), so ``forward`` never waits on
the device and can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from kernelplane import AttentionMetadata, AttentionRequest, KVPages
from kernelplane.kv_cache import check_kernel_inputs

from . import kernels
from .configs import TARGET_PROGRAMS_PER_SM, TileConfig, heads_per_program, num_kv_splits, tile_configs

_LOG2E = 1.4426950408889634
# Under Triton's CPU interpreter bfloat16 dots need float32 operands (see kernels._dot).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"


@dataclass(frozen=True)
class LaunchPlan:
    tiles: TileConfig
    heads: int  # query heads per program
    splits: int  # KV splits (1: write the output directly)
    tokens_per_split: int


class TritonPagedAttention:
    """Paged MHA/GQA/MQA attention in Triton; see ``kernels`` for the algorithm."""

    # forward() never syncs with the device and reads lengths from device
    # memory, so the engine may capture it in CUDA graphs.
    supports_cuda_graphs = True

    def __init__(self, request: AttentionRequest, sm_count: Optional[int] = None):
        self.request = request
        self.group = request.num_heads // request.num_kv_heads
        self.heads = heads_per_program(self.group)
        self.scale_log2 = request.softmax_scale * _LOG2E
        self.sm_count = sm_count
        self.unfit_tiles: set[TileConfig] = set()  # ran out of shared memory / registers on this GPU

    def plan(self, num_tokens: int, meta: AttentionMetadata, block_size: int,
             tiles: Optional[TileConfig] = None, programs_per_sm: float = TARGET_PROGRAMS_PER_SM) -> LaunchPlan:
        """The launch for this batch; ``tiles`` and ``programs_per_sm`` let benchmarks sweep."""
        req = self.request
        max_q = max(1, meta.max_query_len)
        if tiles is None:
            candidates = tile_configs(req.head_dim, self.heads, max_q)
            tiles = next((t for t in candidates if t not in self.unfit_tiles), candidates[-1])
        block_q = tiles.block_m // self.heads
        programs = self._num_q_tiles(num_tokens, meta.num_seqs, block_q, max_q) * (req.num_heads // self.heads)
        max_kv = meta.max_seq_len if meta.max_seq_len > 0 else meta.block_tables.shape[1] * block_size
        splits, per_split = num_kv_splits(programs, max_kv, tiles.block_n, self.sm_count, programs_per_sm)
        return LaunchPlan(tiles, self.heads, splits, per_split)

    def warmup(self, even_interpreted: bool = False) -> None:
        """Compile the decode (split and not) and prefill kernels for this
        request now, on tiny random inputs, so that a kernel that cannot run
        here fails at selection time (and selection falls back) rather than on
        the first request. Compiled kernels land in Triton's disk cache. The
        interpreter compiles nothing, so there it is skipped unless asked."""
        from kernelplane.kv_cache import allocate_plain_pages, torch_dtype

        if _INTERPRETED and not even_interpreted:
            return
        req = self.request
        device = "cuda" if torch.cuda.is_available() and not _INTERPRETED else "cpu"
        dtype = torch_dtype(req.dtype)
        bs = req.block_size
        prefill_len = max(2, 65 // self.heads + 1)  # enough rows for the prefill tiles
        seq_len = prefill_len + 2 * bs
        n_blocks = math.ceil(seq_len / bs)
        pages = allocate_plain_pages(2 * n_blocks, bs, req.num_kv_heads, req.head_dim, req.v_dim,
                                     torch_dtype(req.resolved_kv_format), device)
        for t in pages.tensors.values():
            t.normal_()
        tables = [list(range(n_blocks)), list(range(n_blocks, 2 * n_blocks))]
        for query_lens in ([1, 1], [prefill_len, 1]):
            meta = AttentionMetadata.build(query_lens, [seq_len, seq_len], tables, bs, device)
            query = torch.randn(sum(query_lens), req.num_heads, req.head_dim, dtype=dtype, device=device)
            self.forward(query, pages, meta)
            if query_lens == [1, 1]:  # the split-KV path and its combine kernel
                tiles = self.plan(2, meta, bs).tiles
                per_split = math.ceil(seq_len / 2 / tiles.block_n) * tiles.block_n
                self.forward(query, pages, meta, plan=LaunchPlan(tiles, self.heads, 2, per_split))

    @staticmethod
    def _num_q_tiles(num_tokens: int, num_seqs: int, block_q: int, max_query_len: int) -> int:
        if max_query_len <= block_q:
            return num_seqs  # one tile per sequence
        return num_tokens // block_q + num_seqs  # upper bound; see the kernel's tile search

    def forward(self, query: torch.Tensor, pages: KVPages, meta: AttentionMetadata,
                plan: Optional[LaunchPlan] = None) -> torch.Tensor:
        self._check(query, pages, meta)
        req = self.request
        num_tokens = query.shape[0]
        out = torch.empty(num_tokens, req.num_heads, req.v_dim, dtype=query.dtype, device=query.device)
        if num_tokens == 0 or meta.num_seqs == 0:
            return out
        if plan is not None:
            self._launch(plan, query, pages, meta, out)
            return out
        while True:
            plan = self.plan(num_tokens, meta, pages.block_size)
            try:
                self._launch(plan, query, pages, meta, out)
                return out
            except Exception as exc:
                # Tiles too big for this GPU: remember, try the next candidate.
                if type(exc).__name__ != "OutOfResources" or plan.tiles in self.unfit_tiles:
                    raise
                self.unfit_tiles.add(plan.tiles)

    def _launch(self, plan: LaunchPlan, query: torch.Tensor, pages: KVPages, meta: AttentionMetadata,
                out: torch.Tensor) -> None:
        req = self.request
        num_tokens = query.shape[0]
        key, value = pages.key, pages.value
        q = query
        if key.dtype != query.dtype:  # mixed cache/query dtypes: compute in float32
            q = query.float()
        tiles = plan.tiles
        block_q = tiles.block_m // plan.heads
        max_q = max(1, meta.max_query_len)
        grid = (self._num_q_tiles(num_tokens, meta.num_seqs, block_q, max_q), req.num_heads // plan.heads, plan.splits)

        if plan.splits > 1:
            partial = torch.empty(num_tokens, req.num_heads, plan.splits, req.v_dim, dtype=torch.float32,
                                  device=query.device)
            lse = torch.empty(num_tokens, req.num_heads, plan.splits, dtype=torch.float32, device=query.device)
            target, target_lse = partial, lse
            stride_os = partial.stride(2)
        else:
            target, target_lse = out, out  # lse unused without splits
            stride_os = 0

        kernels.paged_attention_kernel[grid](
            q, key, value, target, target_lse,
            meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.num_seqs, self.scale_log2, req.sliding_window or 0, plan.tokens_per_split,
            q.stride(0), q.stride(1),
            key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2),
            target.stride(0), target.stride(1), stride_os,
            target_lse.stride(0), target_lse.stride(1),
            meta.block_tables.stride(0),
            GROUP=self.group, HEADS=plan.heads,
            BLOCK_M=tiles.block_m, BLOCK_Q=block_q, BLOCK_N=tiles.block_n, PAGE=pages.block_size,
            HEAD_DIM=req.head_dim, HEAD_DIM_V=req.v_dim,
            BLOCK_D=_block_dim(req.head_dim), BLOCK_DV=_block_dim(req.v_dim),
            CAUSAL=req.causal, HAS_WINDOW=req.sliding_window is not None, SPLIT=plan.splits > 1,
            TILE_PER_SEQ=max_q <= block_q, SEARCH_STEPS=max(1, math.ceil(math.log2(meta.num_seqs + 1))),
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST_DOT=_INTERPRETED and q.dtype == torch.bfloat16,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
        if plan.splits > 1:
            kernels.combine_splits_kernel[(num_tokens, req.num_heads)](
                partial, lse, out, plan.splits,
                partial.stride(0), partial.stride(1), partial.stride(2),
                lse.stride(0), lse.stride(1),
                out.stride(0), out.stride(1),
                HEAD_DIM_V=req.v_dim, BLOCK_S=_block_dim(plan.splits, minimum=2), BLOCK_DV=_block_dim(req.v_dim),
                num_warps=4,
            )

    def _check(self, query: torch.Tensor, pages: KVPages, meta: AttentionMetadata) -> None:
        check_kernel_inputs(query, pages, meta, self.request)
        if not pages.is_plain or pages.quantizer is not None or pages.mla:
            raise ValueError(f"triton attention reads plain K/V pages only, got format {pages.format!r}"
                             + (" (MLA)" if pages.mla else ""))
        if pages.key.stride(3) != 1 or pages.value.stride(3) != 1:
            raise ValueError("K/V pages' last dim must be contiguous")
        if pages.block_size & (pages.block_size - 1):
            raise ValueError(f"page size {pages.block_size} is not a power of two")


def _block_dim(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())
