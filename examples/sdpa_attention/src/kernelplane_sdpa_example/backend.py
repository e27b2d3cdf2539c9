"""Paged attention: gather each sequence's pages, then one SDPA call per sequence."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernelplane import AttentionMetadata, AttentionRequest, KVPages


class SdpaAttention:
    def __init__(self, request: AttentionRequest):
        self.request = request

    def forward(self, query: torch.Tensor, pages: KVPages, meta: AttentionMetadata) -> torch.Tensor:
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
            visible = torch.ones(q1 - q0, seq_len, dtype=torch.bool, device=query.device)
            if req.causal:
                visible &= k_pos <= q_pos
            if req.sliding_window is not None:
                visible &= k_pos > q_pos - req.sliding_window
            o = F.scaled_dot_product_attention(
                query[q0:q1].transpose(0, 1), k.transpose(0, 1).to(query.dtype), v.transpose(0, 1).to(query.dtype),
                attn_mask=visible, scale=req.softmax_scale, enable_gqa=req.num_heads != req.num_kv_heads)
            out[q0:q1] = o.transpose(0, 1)
        return out
