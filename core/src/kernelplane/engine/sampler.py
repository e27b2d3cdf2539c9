"""Turning logits into tokens: greedy, temperature, top-k, top-p, logprobs."""
from __future__ import annotations

from typing import Sequence

import torch

from ..spec.verify import inverse_cdf
from .params import SamplingParams


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled request draws from (rows of ``logits``)."""
    rows = logits.reshape(-1, logits.shape[-1])
    return target_probs_batch(rows, [params] * rows.shape[0]).reshape(logits.shape)


def target_probs_batch(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Row ``i``'s distribution under request ``i``'s settings: softmax of
    logits / temperature over the top-k tokens, then the smallest prefix (by
    probability) whose mass reaches top-p, renormalized."""
    temperature = torch.tensor([max(p.temperature, 1e-5) for p in params], dtype=torch.float32, device=logits.device)
    logits = logits.float() / temperature[:, None]
    top_k = [min(p.top_k, logits.shape[-1]) for p in params]
    if any(top_k):
        kth_col = torch.tensor([k - 1 if k else 0 for k in top_k], device=logits.device)
        kth = torch.topk(logits, max(top_k), dim=-1).values.gather(1, kth_col[:, None])
        kth = kth.masked_fill(torch.tensor([k == 0 for k in top_k], device=logits.device)[:, None], float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:  # only these rows: a top_p of 1 must not trim the tail through rounding
        idx = torch.tensor(nucleus, device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in nucleus], dtype=torch.float32, device=logits.device)
        sorted_probs, order = probs[idx].sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        kept = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
        probs[idx] = kept / kept.sum(-1, keepdim=True)
    return probs


def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row of ``logits``, row ``i`` drawn from request ``i``'s distribution.

    Each request draws one uniform number from its own generator (so a
    seeded request gets the same tokens whatever else is in the batch) and
    the rows are inverted through their CDFs together: one transfer back
    for the whole batch instead of a vocabulary-sized copy per request.
    """
    if not params:
        return []
    probs = target_probs_batch(logits, params)
    u = torch.tensor([float(torch.rand((), generator=g)) for g in generators], dtype=torch.float64, device=probs.device)
    return inverse_cdf(probs.double(), u).tolist()


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
