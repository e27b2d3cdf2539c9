"""Verifying draft tokens so that the output equals non-speculative decoding.

The target model scores ``[last token] + drafts`` in one forward pass, which
gives ``k + 1`` next-token rows for a request with ``k`` drafts: row ``j``
is the target's prediction after the first ``j`` drafts.

**Batch layout (ragged rows).** Requests may have different numbers of
drafts. A batch is ``drafts``, one list of token ids per request, plus a
flat tensor of target rows: request ``i`` owns ``len(drafts[i]) + 1``
consecutive rows, requests in order. This is how the engine lays out the
logits of a verification step, so no padding or copying is needed. Draft
distributions, when given, use the same layout with ``len(drafts[i])`` rows
per request. ``row_offsets(drafts)`` gives the start row of each request.

**Greedy** requests keep the longest prefix of drafts equal to the target's
argmax, then add the target's own next token (the bonus). The result is
always a prefix of the target's argmax rows: exactly the tokens plain greedy
decoding would produce.

**Sampled** requests use rejection sampling. Drafts from n-gram lookup or a
greedy head carry no probabilities, so each draft ``d`` is treated as a
point mass ``q = 1[d]``: accept it with probability ``p(d)``; on rejection
sample from ``p`` with ``d`` removed and renormalized (which is
``max(p - q, 0)`` normalized). When the proposer does supply its
distribution ``q``, accept with ``min(1, p(d) / q(d))`` and resample from
``max(p - q, 0)`` normalized. If every draft is accepted, a bonus token is
sampled from the last row. Either way each emitted token is distributed
exactly as the target's.

**Randomness.** Each request draws exactly ``k + 1`` uniforms from its own
``torch.Generator`` per call (``k`` acceptance tests, one for the final
sample), whatever is accepted, so a seeded request is reproducible and
independent of what else is in the batch. The final token is drawn by
inverse-CDF lookup with that last uniform, vectorized over the batch, so a
whole batch costs one device-to-host copy.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Tokens = Sequence[int]
Generators = Optional[Sequence[Optional[torch.Generator]]]


def row_offsets(drafts: Sequence[Tokens]) -> list[int]:
    """Start row of each request in the flat target rows, plus the total at the end."""
    offsets = [0]
    for d in drafts:
        offsets.append(offsets[-1] + len(d) + 1)
    return offsets


# ---- greedy ---------------------------------------------------------------

def greedy_accept(drafts: Tokens, target_argmax: Union[Tokens, torch.Tensor]) -> list[int]:
    """Accepted tokens for one request: the matching prefix of ``drafts`` plus one bonus token.

    ``target_argmax`` has ``len(drafts) + 1`` entries: the target's choice
    after the last accepted token and after each draft.
    """
    return greedy_accept_batch([drafts], target_argmax)[0]


def greedy_accept_batch(drafts: Sequence[Tokens], target_argmax: Union[Tokens, torch.Tensor]) -> list[list[int]]:
    """``greedy_accept`` for a batch in the ragged-row layout (one flat entry per row)."""
    argmax = _as_list(target_argmax, "target_argmax")
    offsets = row_offsets(drafts)
    if len(argmax) != offsets[-1]:
        raise ValueError(f"target_argmax has {len(argmax)} rows; {len(drafts)} requests with "
                         f"{offsets[-1] - len(drafts)} drafts need {offsets[-1]}")
    out = []
    for d, start in zip(drafts, offsets):
        rows = argmax[start: start + len(d) + 1]
        n = 0
        while n < len(d) and d[n] == rows[n]:
            n += 1
        out.append(rows[: n + 1])  # accepted drafts equal the argmax, so the argmax prefix is the answer
    return out


def _as_list(values: Union[Tokens, torch.Tensor], name: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be one-dimensional (one token per row), got shape {tuple(values.shape)}")
        return values.tolist()
    return [int(v) for v in values]


# ---- rejection sampling ---------------------------------------------------

def rejection_sample(drafts: Tokens, target_probs: torch.Tensor, generator: Optional[torch.Generator] = None,
                     draft_probs: Optional[torch.Tensor] = None) -> list[int]:
    """Accepted tokens for one request, distributed exactly as the target's.

    ``target_probs``: ``[k + 1, V]``, rows summing to 1 (after temperature,
    top-k, top-p). ``draft_probs``: optional ``[k, V]``, the proposer's
    distribution for each draft; ``None`` means each draft is a point mass.
    """
    return rejection_sample_batch([drafts], target_probs, [generator], draft_probs)[0]


def rejection_sample_batch(drafts: Sequence[Tokens], target_probs: torch.Tensor, generators: Generators = None,
                           draft_probs: Optional[torch.Tensor] = None) -> list[list[int]]:
    """``rejection_sample`` for a batch in the ragged-row layout.

    ``target_probs``: ``[sum(k_i + 1), V]``. ``generators``: one per request
    (``None`` entries, or ``None`` for all, use torch's default generator).
    ``draft_probs``: ``None`` (every draft is a point mass) or
    ``[sum(k_i), V]`` for every request of the batch; ``q(d) > 0`` is
    required for each draft ``d``, as it was sampled from ``q``.
    """
    n = len(drafts)
    if n == 0:
        return []
    offsets = row_offsets(drafts)
    if target_probs.dim() != 2 or target_probs.shape[0] != offsets[-1]:
        raise ValueError(f"target_probs must be [{offsets[-1]}, vocab] for {n} requests with "
                         f"{offsets[-1] - n} drafts, got shape {tuple(target_probs.shape)}")
    vocab = target_probs.shape[1]
    num_drafts = offsets[-1] - n
    if draft_probs is not None and tuple(draft_probs.shape) != (num_drafts, vocab):
        raise ValueError(f"draft_probs must be [{num_drafts}, {vocab}], got shape {tuple(draft_probs.shape)}")
    if generators is None:
        generators = [None] * n
    if len(generators) != n:
        raise ValueError(f"need one generator per request: {n} requests, {len(generators)} generators")
    flat_drafts = [int(t) for d in drafts for t in d]
    bad = [t for t in flat_drafts if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"draft token ids must lie in [0, {vocab}), got {bad[:5]}")

    device = target_probs.device
    # k + 1 uniforms per request, laid out like the target rows: row j's
    # uniform tests draft j, the request's last one draws the final token.
    uniforms = torch.cat([_uniforms(len(d) + 1, g) for d, g in zip(drafts, generators)]).to(device)
    probs = target_probs.to(torch.float64)

    lengths = torch.tensor([len(d) for d in drafts], device=device)
    starts = torch.tensor(offsets[:-1], device=device)
    kmax = max(len(d) for d in drafts)
    if kmax:
        draft_rows = torch.tensor([s + j for d, s in zip(drafts, offsets) for j in range(len(d))], device=device)
        tokens = torch.tensor(flat_drafts, device=device)
        p_d = probs[draft_rows, tokens]
        if draft_probs is None:
            accept_prob = p_d
        else:
            q_d = draft_probs.to(device=device, dtype=torch.float64)[torch.arange(num_drafts, device=device), tokens]
            accept_prob = (p_d / q_d).clamp(max=1.0)
        accepted = uniforms[draft_rows] < accept_prob
        # Number of leading acceptances per request: pad with False and count the leading run.
        grid = torch.zeros(n, kmax, dtype=torch.bool, device=device)
        req_of_draft = torch.repeat_interleave(torch.arange(n, device=device), lengths)
        pos_of_draft = draft_rows - starts[req_of_draft]
        grid[req_of_draft, pos_of_draft] = accepted
        num_accepted = grid.long().cumprod(dim=1).sum(dim=1)
    else:
        num_accepted = torch.zeros(n, dtype=torch.long, device=device)

    # The final token of each request: from the residual at the first
    # rejection, or from the last row (the bonus) when all drafts passed.
    final = probs[starts + num_accepted]
    rejected = num_accepted < lengths
    if kmax and bool(rejected.any()):
        draft_index = (starts - torch.arange(n, device=device)) + num_accepted  # flat index of the rejected draft
        rej = rejected.nonzero().squeeze(1)
        rej_draft = draft_index[rej]
        if draft_probs is None:
            residual = final[rej].clone()
            residual[torch.arange(len(rej), device=device), tokens[rej_draft]] = 0.0
        else:
            q = draft_probs.to(device=device, dtype=torch.float64)[rej_draft]
            residual = (final[rej] - q).clamp(min=0.0)
        # A residual of zero mass happens only through rounding (p == q); p itself is then the answer.
        empty = residual.sum(dim=1, keepdim=True) <= 0
        final[rej] = torch.where(empty, final[rej], residual)
    last_uniform = uniforms[starts + lengths]
    sampled = inverse_cdf(final, last_uniform)

    counts = num_accepted.tolist()
    sampled = sampled.tolist()
    return [list(d[:a]) + [s] for d, a, s in zip(drafts, counts, sampled)]


def _uniforms(count: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.rand(count, generator=generator, dtype=torch.float64, device=device).cpu()


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row of non-negative ``weights`` (unnormalized), using uniforms ``u``."""
    cdf = weights.cumsum(dim=1)
    x = (u * cdf[:, -1]).unsqueeze(1)
    index = torch.searchsorted(cdf, x, right=True).squeeze(1)
    # Rounding can put x at the very top; never return a zero-weight index.
    last_positive = weights.shape[1] - 1 - (weights.flip(1) > 0).long().argmax(dim=1)
    return torch.minimum(index, last_positive)
