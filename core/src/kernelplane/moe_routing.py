"""Top-k expert routing, shared by every MoE kernel (routing is not a kernel choice)."""
from __future__ import annotations

from typing import Optional

import torch


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool = True,
                   scoring: str = "softmax", correction_bias: Optional[torch.Tensor] = None,
                   routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(topk_weights [T, k] float32, topk_ids [T, k] int64)``.

    ``scoring="sigmoid"`` with ``correction_bias`` is DeepSeek-V3's rule: the
    bias picks the experts, the unbiased scores weight them.
    """
    logits = router_logits.float()
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"unknown MoE scoring {scoring!r}: expected softmax or sigmoid")
    choice = scores + correction_bias if correction_bias is not None else scores
    topk_ids = choice.topk(top_k, dim=-1).indices
    topk_weights = scores.gather(-1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return topk_weights * routed_scaling_factor, topk_ids
