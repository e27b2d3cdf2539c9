"""Verifying draft tokens so that output equals non-speculative decoding.

The target model scores ``[last token] + drafts`` in one forward, giving
``k + 1`` next-token distributions for a request with ``k`` drafts.

Greedy requests keep the longest prefix of drafts equal to the target's
argmax, then add the target's own next token (the bonus): identical tokens
to plain greedy decoding.

Sampled requests use rejection sampling. Drafts from n-gram lookup or greedy
heads carry no probabilities, so each draft ``d`` is a point mass: accept it
with probability ``p(d)``; on rejection sample from ``p`` with ``d`` removed
and renormalized (``max(p - q, 0)`` for the point mass ``q``). When a
proposer does supply its distribution ``q``, accept with ``min(1, p(d)/q(d))``
and resample from ``max(p - q, 0)``. Either way every emitted token is
distributed exactly as the target's.
"""
from __future__ import annotations

from typing import Optional

import torch


def greedy_accept(drafts: list[int], target_argmax: list[int]) -> list[int]:
    """Accepted tokens: the matching prefix of ``drafts`` plus one bonus token.

    ``target_argmax`` has ``len(drafts) + 1`` entries: the target's choice
    after the last accepted token and after each draft.
    """
    if len(target_argmax) != len(drafts) + 1:
        raise ValueError(f"need {len(drafts) + 1} target tokens for {len(drafts)} drafts, got {len(target_argmax)}")
    out = []
    for d, t in zip(drafts, target_argmax):
        if d != t:
            out.append(t)
            return out
        out.append(d)
    out.append(target_argmax[-1])
    return out


def rejection_sample(drafts: list[int], target_probs: torch.Tensor, generator: Optional[torch.Generator] = None,
                     draft_probs: Optional[torch.Tensor] = None) -> list[int]:
    """Accepted tokens for one request, distributed exactly as the target's.

    ``target_probs``: ``[k + 1, V]``, rows summing to 1 (after temperature,
    top-k, top-p). ``draft_probs``: optional ``[k, V]``; ``None`` means each
    draft is a point mass.
    """
    k = len(drafts)
    if target_probs.shape[0] != k + 1:
        raise ValueError(f"need {k + 1} target distributions for {k} drafts, got {target_probs.shape[0]}")
    probs = target_probs.float()
    device = probs.device
    uniforms = torch.rand(k, generator=generator, device="cpu") if k else None
    out: list[int] = []
    for i, d in enumerate(drafts):
        p = probs[i]
        if draft_probs is None:
            accept_prob = p[d].item()
        else:
            q_d = draft_probs[i, d].item()
            accept_prob = min(1.0, p[d].item() / q_d) if q_d > 0 else 0.0
        if uniforms[i].item() < accept_prob:
            out.append(d)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = (p - draft_probs[i].float().to(device)).clamp_min(0.0)
        total = residual.sum()
        if total <= 0:  # p was (numerically) the point mass itself; keep the draft
            out.append(d)
            continue
        out.append(_sample(residual / total, generator))
        return out
    out.append(_sample(probs[k], generator))
    return out


def _sample(probs: torch.Tensor, generator: Optional[torch.Generator]) -> int:
    # Sample on the CPU so a per-request CPU generator stays reproducible on any device.
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())
