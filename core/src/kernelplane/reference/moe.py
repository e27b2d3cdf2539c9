"""Reference mixture-of-experts: a loop over experts with precomputed routing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..capabilities import MoERequest

ACTIVATIONS = {"silu": F.silu, "gelu": lambda x: F.gelu(x, approximate="tanh")}


class ReferenceMoE:
    def __init__(self, request: MoERequest):
        self.act = ACTIVATIONS[request.activation]

    def forward(self, hidden, w13, w2, topk_weights, topk_ids):
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        inter = w13.shape[1] // 2
        for expert in torch.unique(topk_ids).tolist():
            token_idx, slot = (topk_ids == expert).nonzero(as_tuple=True)
            x = hidden[token_idx].float()
            gate_up = x @ w13[expert].float().t()
            h = self.act(gate_up[:, :inter]) * gate_up[:, inter:]
            y = h @ w2[expert].float().t()
            out.index_add_(0, token_idx, y * topk_weights[token_idx, slot, None].float())
        return out.to(hidden.dtype)
