"""Paged attention on torch's scaled_dot_product_attention.

Decode batches (one query per sequence) gather every sequence's pages into
one padded batch and make one SDPA call per layer; other batches (prefill,
chunked prefill, speculative verification) make one call per sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernelplane import AttentionMetadata, AttentionRequest, KVPages


class SdpaAttention:
    def __init__(self, request: AttentionRequest):
        self.request = request

    def forward(self, query: torch.Tensor, pages: KVPages, meta: AttentionMetadata) -> torch.Tensor:
        if meta.is_decode_only:
            return self._decode(query, pages, meta)
        req = self.request
        bs = pages.block_size
        out = torch.empty(query.shape[0], req.num_heads, req.v_dim, dtype=query.dtype, device=query.device)
        starts = meta.query_start_loc.tolist()
        for b, seq_len in enumerate(meta.seq_lens_cpu or meta.seq_lens.tolist()):
            q0, q1 = starts[b], starts[b + 1]
            if q1 == q0:
                continue
            blocks = meta.block_tables[b, : (seq_len + bs - 1) // bs].long()
            k = pages.key.index_select(0, blocks).flatten(0, 1)[:seq_len]
            v = pages.value.index_select(0, blocks).flatten(0, 1)[:seq_len]
            q_pos = torch.arange(seq_len - (q1 - q0), seq_len, device=query.device)[:, None]
            k_pos = torch.arange(seq_len, device=query.device)[None, :]
            visible = self._visible(q_pos, k_pos)
            o = F.scaled_dot_product_attention(
                query[q0:q1].transpose(0, 1), k.transpose(0, 1).to(query.dtype), v.transpose(0, 1).to(query.dtype),
                attn_mask=visible, scale=req.softmax_scale, enable_gqa=req.num_heads != req.num_kv_heads)
            out[q0:q1] = o.transpose(0, 1)
        return out

    def _decode(self, query: torch.Tensor, pages: KVPages, meta: AttentionMetadata) -> torch.Tensor:
        req = self.request
        bs = pages.block_size
        seq_lens = meta.seq_lens.long()
        tables = meta.block_tables[:, : (meta.max_seq_len + bs - 1) // bs].long()
        k = pages.key[tables].flatten(1, 2)  # [B, padded length, KV heads, dim]
        v = pages.value[tables].flatten(1, 2)
        k_pos = torch.arange(k.shape[1], device=query.device)[None, :]
        written = k_pos < seq_lens[:, None]  # [B, padded length]
        # Slots past a sequence's end were never written and may hold NaN: a
        # masked score is still computed, and NaN survives any mask.
        k = k.masked_fill(~written[..., None, None], 0.0)
        v = v.masked_fill(~written[..., None, None], 0.0)
        visible = written & self._visible((seq_lens - 1)[:, None], k_pos)
        o = F.scaled_dot_product_attention(
            query[:, :, None], k.transpose(1, 2).to(query.dtype), v.transpose(1, 2).to(query.dtype),
            attn_mask=visible[:, None, None, :], scale=req.softmax_scale,
            enable_gqa=req.num_heads != req.num_kv_heads)  # [B, heads, 1, dim]
        return o[:, :, 0]

    def _visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        visible = torch.ones(q_pos.shape[0], k_pos.shape[-1], dtype=torch.bool, device=q_pos.device)
        if self.request.causal:
            visible &= k_pos <= q_pos
        if self.request.sliding_window is not None:
            visible &= k_pos > q_pos - self.request.sliding_window
        return visible
