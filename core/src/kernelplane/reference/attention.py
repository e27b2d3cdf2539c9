"""Reference paged attention (MHA/GQA/MQA and absorbed MLA), prefill and decode.

Computes in float32 and returns the query's dtype. Decode-only batches take a
batched path (pad every sequence to the longest, mask the rest); batches with
prefill loop over sequences.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..capabilities import AttentionRequest
from ..kv_cache import AttentionMetadata, KVPages, exact_tail_in_use, exact_tail_kv


def gather_kv(pages: KVPages, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the given blocks, ``[n * block_size, heads, dim]`` each."""
    if pages.quantizer is not None:
        k, v = pages.quantizer.dequantize(pages, block_ids)
    else:
        k = pages.key.index_select(0, block_ids)
        v = pages.value.index_select(0, block_ids)
    return k.flatten(0, 1), v.flatten(0, 1)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, seq_len: torch.Tensor | int,
                   causal: bool, sliding_window: int | None) -> torch.Tensor:
    """Boolean [..., q, k] mask of the keys each query may see."""
    allowed = k_pos[None, :] < (seq_len if isinstance(seq_len, int) else seq_len[..., None, None])
    if causal:
        allowed = allowed & (k_pos[None, :] <= q_pos[..., :, None])
    if sliding_window is not None:
        allowed = allowed & (k_pos[None, :] > q_pos[..., :, None] - sliding_window)
    return allowed


class ReferenceAttention:
    reads_exact_tail = True  # quantized pages: the first and latest tokens come from the exact tail

    def __init__(self, request: AttentionRequest):
        self.request = request
        self.scale = request.softmax_scale
        self.group = request.num_heads // request.num_kv_heads

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                exact: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """q [..., Q, Hq, D], k/v [..., K, Hkv, D], mask [..., Q, K] -> [..., Q, Hq, Dv] (float32).

        GQA without copying K/V: query head ``j * group + g`` reads KV head
        ``j``, so each KV head attends for ``group * Q`` query rows at once.
        ``exact``: (k, v, use [..., Q, K]): where ``use``, a query reads that
        key and value from these instead (an exact tail over quantized pages).
        """
        *lead, nq, hq, d = q.shape
        hkv, g = k.shape[-2], self.group
        rows = q.float().reshape(*lead, nq, hkv, g, d).movedim(-4, -2).reshape(*lead, hkv, g * nq, d)

        def per_row(m: torch.Tensor) -> torch.Tensor:  # [..., Q, K] -> [..., 1, G*Q, K]
            return m.unsqueeze(-3).expand(*m.shape[:-2], g, nq, m.shape[-1]).reshape(*m.shape[:-2], 1, g * nq, -1)

        def scores_and_values(k, v, seen):
            # Slots no query may see (padding, unwritten pages) can hold anything, NaN included: 0 * NaN is NaN.
            v = v.masked_fill(~seen.any(dim=-2)[..., None, None], 0.0)
            return (rows @ k.float().movedim(-3, -1)) * self.scale, v.float().movedim(-3, -2)  # [..., Hkv, G*Q, K]

        if exact is None:
            scores, values = scores_and_values(k, v, mask)
        else:
            k_exact, v_exact, use = exact
            use = use & mask
            scores, values = scores_and_values(k, v, mask & ~use)
            exact_scores, exact_values = scores_and_values(k_exact, v_exact, use)
            scores = torch.where(per_row(use), exact_scores, scores)
        scores = scores.masked_fill(~per_row(mask), float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
        if exact is None:
            out = probs @ values  # [..., Hkv, G*Q, Dv]
        else:
            from_exact = per_row(use).float()
            out = (probs * (1 - from_exact)) @ values + (probs * from_exact) @ exact_values
        return out.reshape(*lead, hkv, g, nq, -1).movedim(-2, -4).reshape(*lead, nq, hq, -1)

    def forward(self, query: torch.Tensor, pages: KVPages, meta: AttentionMetadata) -> torch.Tensor:
        req = self.request
        bs = pages.block_size
        if meta.is_decode_only and pages.quantizer is None:
            # One query per sequence: gather all pages at once, padded.
            n_blocks = (meta.max_seq_len + bs - 1) // bs
            tables = meta.block_tables[:, :n_blocks].long()
            k = pages.key[tables].flatten(1, 2)  # [B, n_blocks*bs, H, D]
            v = pages.value[tables].flatten(1, 2)
            k_pos = torch.arange(k.shape[1], device=query.device)
            q_pos = (meta.seq_lens.long() - 1)[:, None]
            mask = attention_mask(q_pos, k_pos, meta.seq_lens.long(), req.causal, req.sliding_window)
            out = self._attend(query[:, None], k, v, mask)
            return out[:, 0].to(query.dtype)

        out = torch.empty(query.shape[0], req.num_heads, pages.head_dim_v, dtype=query.dtype, device=query.device)
        starts = meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        tail = exact_tail_in_use(pages, meta)
        if tail:
            tail_positions = pages.exact_tail.entry_positions(meta.seq_lens)
            slots = meta.seq_slots.tolist()
        for b, seq_len in enumerate(seq_lens):
            q0, q1 = starts[b], starts[b + 1]
            if q1 == q0:
                continue
            n_blocks = (seq_len + bs - 1) // bs
            k, v = gather_kv(pages, meta.block_tables[b, :n_blocks].long())
            k, v = k[:seq_len], v[:seq_len]
            k_pos = torch.arange(seq_len, device=query.device)
            q_pos = torch.arange(seq_len - (q1 - q0), seq_len, device=query.device)
            mask = attention_mask(q_pos, k_pos, seq_len, req.causal, req.sliding_window)
            exact = _exact_tail_for(pages, slots[b], tail_positions[b], k, v, k_pos, q_pos) if tail else None
            out[q0:q1] = self._attend(query[q0:q1], k, v, mask, exact).to(query.dtype)
        return out


def _exact_tail_for(pages: KVPages, slot: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_pos: torch.Tensor, q_pos: torch.Tensor):
    """(k, v, use) for ``_attend``: the sequence's K/V with the positions its
    exact tail holds replaced by the tail's vectors, and which (query, key)
    pairs read them (``ExactTail.reads_exact``)."""
    tail_k, tail_v = exact_tail_kv(pages, slot)
    valid = positions >= 0
    held = torch.zeros(k.shape[0], dtype=torch.bool, device=k.device)
    held[positions[valid]] = True
    k, v = k.float().clone(), v.float().clone()
    k[positions[valid]] = tail_k[valid]
    v[positions[valid]] = tail_v[valid]
    return k, v, pages.exact_tail.reads_exact(k_pos, q_pos, held)
