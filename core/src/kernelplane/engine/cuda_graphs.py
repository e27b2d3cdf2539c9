"""CUDA graphs for decode and speculative-verification steps.

A small model's decode step is a thousand tiny kernels, and launching them
from Python costs far more than running them. For steps where every
sequence feeds a fixed number of tokens ``q`` (1 for plain decode, 1 + k when
verifying k drafts), the forward is captured once per padded batch size and
replayed: inputs are copied into static buffers, the graph runs, the hidden
states are read back.

Padding is harmless by construction. Padded sequences and padded draft
positions write their K/V into a scratch block that no request owns. A
sequence with fewer than ``q - 1`` drafts gets filler tokens *after* its real
ones; causal attention keeps every real token from seeing them, and their
outputs are dropped. Capture uses ``max_seq_len = max_model_len`` so the
attention backend plans for the longest context; backends read the real
lengths from ``seq_lens`` on the device. Only backends that declare
``supports_cuda_graphs = True`` (no host syncs or data-dependent host logic
in ``forward``) are captured.
"""
from __future__ import annotations

import logging
import math

import torch

from ..kv_cache import AttentionMetadata, placeholder_writes

log = logging.getLogger("kernelplane")

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class StepGraphs:
    def __init__(self, model, kv_caches, max_batch: int, tokens_per_seq: int, max_model_len: int, block_size: int,
                 scratch_block: int, device: str, pool=None, scratch_slot: int = 0):
        self.model, self.kv_caches = model, kv_caches
        self.q = tokens_per_seq
        self.block_size, self.scratch_block = block_size, scratch_block
        self.max_model_len = max_model_len
        self.sizes = [s for s in CAPTURE_SIZES if s <= max_batch] or [1]
        if self.sizes[-1] < max_batch:
            self.sizes.append(max_batch)
        rows = self.sizes[-1] * self.q
        width = math.ceil((max_model_len + self.q) / block_size)
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(rows, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(self.sizes[-1], dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(0, rows + 1, self.q, dtype=torch.int32, device=device)
        self.block_tables = torch.full((self.sizes[-1], width), scratch_block, dtype=torch.int32, device=device)
        # Padded sequences take the scratch slot (exact_tail.py), so their rows never touch a running sequence's.
        self.scratch_slot = scratch_slot
        self.seq_slots = torch.full((self.sizes[-1],), scratch_slot, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = pool

    def _meta(self, b: int) -> AttentionMetadata:
        n = b * self.q
        return AttentionMetadata(query_start_loc=self.query_start_loc[:b + 1], seq_lens=self.seq_lens[:b],
                                 block_tables=self.block_tables[:b], slot_mapping=self.slot_mapping[:n],
                                 max_query_len=self.q, max_seq_len=self.max_model_len + self.q - 1,
                                 query_lens_cpu=[self.q] * b, seq_lens_cpu=[], seq_slots=self.seq_slots[:b])

    @torch.inference_mode()
    def capture(self) -> None:
        big = self.sizes[-1]
        self.slot_mapping.fill_(self.scratch_block * self.block_size)
        self.seq_lens.fill_(self.q)
        self.positions.copy_(torch.arange(self.q, device=self.positions.device).repeat(big))
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            n = b * self.q
            with placeholder_writes():  # dummy rows: no quantizer may learn from them
                for _ in range(2):  # compile kernels and settle allocations outside the graph
                    self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, self._meta(b))
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                # A fresh meta: what layers derive from it (meta.derived) must be computed inside the graph.
                meta = self._meta(b)
                with torch.cuda.graph(graph, pool=self.pool):
                    hidden = self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, meta)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = (graph, hidden)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for %d token(s) per sequence, batch sizes %s", self.q, self.sizes)

    def padded_size(self, n: int) -> int | None:
        return next((s for s in self.sizes if s >= n), None)

    def run(self, tokens: list[list[int]], starts: list[int], block_tables: list[list[int]],
            seq_slots: list[int]) -> torch.Tensor:
        """Hidden states, compacted to the real tokens in order, for sequences
        that feed ``tokens[i]`` (at most ``q`` each) from position ``starts[i]``."""
        n = len(tokens)
        b = self.padded_size(n)
        graph, hidden = self.graphs[b]
        bs, q, scratch = self.block_size, self.q, self.scratch_block * self.block_size
        width = self.block_tables.shape[1]
        ids, pos, slots, keep = [], [], [], []
        for i, (toks, start, table) in enumerate(zip(tokens, starts, block_tables)):
            for j in range(q):
                p = start + j
                real = j < len(toks)
                ids.append(toks[j] if real else 0)
                pos.append(min(p, self.max_model_len - 1))
                slots.append(table[p // bs] * bs + p % bs if real else scratch)
                if real:
                    keep.append(i * q + j)
        pad = (b - n) * q
        ids += [0] * pad
        pos += [0] * pad
        slots += [scratch] * pad
        seq_lens = [s + q for s in starts] + [q] * (b - n)
        rows = [t + [self.scratch_block] * (width - len(t)) for t in block_tables]
        rows += [[self.scratch_block] * width] * (b - n)
        self.input_ids[:b * q].copy_(torch.tensor(ids))
        self.positions[:b * q].copy_(torch.tensor(pos))
        self.slot_mapping[:b * q].copy_(torch.tensor(slots))
        self.seq_lens[:b].copy_(torch.tensor(seq_lens, dtype=torch.int32))
        self.block_tables[:b].copy_(torch.tensor(rows, dtype=torch.int32))
        self.seq_slots[:b].copy_(torch.tensor(list(seq_slots) + [self.scratch_slot] * (b - n), dtype=torch.int32))
        graph.replay()
        if len(keep) == b * q:
            return hidden
        return hidden[torch.tensor(keep, device=hidden.device)]
