"""CUDA graphs for decode steps.

A small model's decode step is a thousand tiny kernels, and launching them
from Python costs far more than running them. For batches where every
sequence decodes exactly one token, the whole forward is captured once per
padded batch size and replayed: inputs are copied into static buffers, the
graph runs, the hidden states are read back.

Padding rows decode into a scratch KV block that no request owns. Capture
uses ``max_seq_len = max_model_len`` so the attention backend plans for the
longest context; backends read the real lengths from ``seq_lens`` on the
device, so the plan stays valid as sequences grow. Only backends that
declare ``supports_cuda_graphs = True`` (no host syncs, no data-dependent
host logic in ``forward``) are captured.
"""
from __future__ import annotations

import logging
import math

import torch

from ..kv_cache import AttentionMetadata

log = logging.getLogger("kernelplane")

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_batch: int, max_model_len: int, block_size: int, scratch_block: int,
                 device: str):
        self.model, self.kv_caches = model, kv_caches
        self.block_size, self.scratch_block = block_size, scratch_block
        self.max_model_len = max_model_len
        self.sizes = [s for s in CAPTURE_SIZES if s <= max_batch] or [1]
        if self.sizes[-1] < max_batch:
            self.sizes.append(max_batch)
        big = self.sizes[-1]
        width = math.ceil(max_model_len / block_size)
        self.input_ids = torch.zeros(big, dtype=torch.long, device=device)
        self.positions = torch.zeros(big, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(big, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(big, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(big + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.full((big, width), scratch_block, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(query_start_loc=self.query_start_loc[:b + 1], seq_lens=self.seq_lens[:b],
                                 block_tables=self.block_tables[:b], slot_mapping=self.slot_mapping[:b],
                                 max_query_len=1, max_seq_len=self.max_model_len,
                                 query_lens_cpu=[1] * b, seq_lens_cpu=[])

    @torch.inference_mode()
    def capture(self) -> None:
        self._reset_padding(self.sizes[-1])
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            meta = self._meta(b)
            for _ in range(2):  # compile kernels and settle allocations outside the graph
                self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden = self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, meta)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = (graph, hidden)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def _reset_padding(self, b: int) -> None:
        self.input_ids[:b].zero_()
        self.positions[:b].zero_()
        self.slot_mapping[:b].fill_(self.scratch_block * self.block_size)
        self.seq_lens[:b].fill_(1)
        self.block_tables[:b].fill_(self.scratch_block)

    def padded_size(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    def run(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Hidden states for ``len(input_ids)`` one-token sequences."""
        n = len(input_ids)
        b = self.padded_size(n)
        graph, hidden = self.graphs[b]
        bs = self.block_size
        slots = [table[p // bs] * bs + p % bs for table, p in zip(block_tables, positions)]
        width = self.block_tables.shape[1]
        rows = [t + [self.scratch_block] * (width - len(t)) for t in block_tables]
        # One host->device copy per buffer; padding rows keep their scratch values.
        self._reset_padding(b)
        self.input_ids[:n].copy_(torch.tensor(input_ids), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(positions), non_blocking=True)
        self.slot_mapping[:n].copy_(torch.tensor(slots), non_blocking=True)
        self.seq_lens[:n].copy_(torch.tensor([p + 1 for p in positions], dtype=torch.int32), non_blocking=True)
        self.block_tables[:n].copy_(torch.tensor(rows, dtype=torch.int32), non_blocking=True)
        graph.replay()
        return hidden[:n]
