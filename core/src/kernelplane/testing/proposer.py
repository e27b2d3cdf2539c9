"""Speculative-proposer conformance: the protocol's contract, not draft quality."""
from __future__ import annotations

import random

import pytest

from ..capabilities import SpecRequest
from ._common import ConformanceBase, build_or_skip


def check_proposer(provider_name: str, method: str, k: int = 4, seed: int = 0) -> None:
    rng = random.Random(seed)
    proposer = build_or_skip("spec_proposer", provider_name, SpecRequest(method=method, num_speculative_tokens=k))
    prompts = {f"r{i}": [rng.randrange(50) for _ in range(rng.randrange(1, 60))] for i in range(4)}
    for rid, toks in prompts.items():
        proposer.add_request(rid, toks)
    ids = list(prompts)
    for step in range(20):
        limits = [rng.randrange(0, k + 1) for _ in ids]
        drafts = proposer.propose(ids, limits)
        assert len(drafts) == len(ids), "propose() must return one list per request"
        for d, limit in zip(drafts, limits):
            assert len(d) <= limit, f"proposed {len(d)} tokens, limit was {limit}"
            assert all(isinstance(t, int) and t >= 0 for t in d), f"drafts must be non-negative ints, got {d}"
        # Deterministic: the same state gives the same proposal.
        assert proposer.propose(ids, limits) == drafts, "propose() is not deterministic for an unchanged state"
        for rid, d in zip(ids, drafts):
            accepted = d[: rng.randrange(0, len(d) + 1)] + [rng.randrange(50)]
            proposer.extend(rid, accepted)
    for rid in ids:
        proposer.remove_request(rid)


class ProposerConformance(ConformanceBase):
    capability = "spec_proposer"
    method: str = ""

    def test_protocol(self, provider):
        if not self.method:
            pytest.skip("set `method` to the SpecRequest.method this proposer serves")
        check_proposer(provider, self.method)
