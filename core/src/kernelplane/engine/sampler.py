"""Turning logits into tokens: greedy, temperature, top-k, top-p, logprobs."""
from __future__ import annotations

from typing import Optional

import torch

from .params import SamplingParams


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled request draws from (rows of ``logits``)."""
    logits = logits.float() / max(params.temperature, 1e-5)
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """One token from one row of logits."""
    if params.greedy:
        return int(logits.argmax().item())
    probs = target_probs(logits, params)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top_n: int) -> list[dict]:
    """Log-probabilities (of the model's raw distribution) for chosen tokens, plus the top n."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for row, tok in zip(logp, token_ids):
        entry = {"token_id": tok, "logprob": float(row[tok]), "top": []}
        if top_n:
            vals, ids = row.topk(top_n)
            entry["top"] = list(zip(ids.tolist(), vals.tolist()))
        out.append(entry)
    return out
