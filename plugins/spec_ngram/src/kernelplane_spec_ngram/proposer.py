"""``NgramProposer``: prompt-lookup drafts for every request of the engine.

Implements ``kernelplane.interfaces.SpeculativeProposer``. Each request owns
an ``NgramIndex`` over its prompt and output and, unless ``backoff`` is off,
a ``DraftBackoff``. ``propose`` only reads state (the same state gives the
same drafts); ``extend`` appends the tokens the engine kept and scores the
last proposal against them: the accepted drafts are the common prefix,
since a rejected draft is always replaced by a different token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from .backoff import DraftBackoff
from .ngram_index import NgramIndex
from .options import NgramOptions


class UnknownRequestError(KeyError):
    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0])


@dataclass
class _RequestState:
    index: NgramIndex
    backoff: Optional[DraftBackoff]
    last_proposal: list[int] = field(default_factory=list)
    num_proposed: int = 0
    num_accepted: int = 0


class NgramProposer:
    def __init__(self, options: NgramOptions):
        self.options = options
        self._requests: dict[str, _RequestState] = {}

    @classmethod
    def from_request(cls, request) -> "NgramProposer":
        return cls(NgramOptions.from_request(request))

    # ---- the SpeculativeProposer protocol --------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Sequence[int]) -> None:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} was already added to the ngram proposer")
        opts = self.options
        self._requests[request_id] = _RequestState(
            index=NgramIndex(opts.min_n, opts.max_n, prompt_token_ids),
            backoff=DraftBackoff(opts.num_speculative_tokens) if opts.backoff else None)

    def propose(self, request_ids: Sequence[str], max_tokens: Sequence[int]) -> list[list[int]]:
        if len(request_ids) != len(max_tokens):
            raise ValueError(f"propose() got {len(request_ids)} request ids but {len(max_tokens)} max_tokens")
        batch_limit = self.options.disable_by_batch_size
        speculate = batch_limit is None or len(request_ids) <= batch_limit
        drafts = []
        for rid, limit in zip(request_ids, max_tokens):
            if limit < 0:
                raise ValueError(f"max_tokens for request {rid!r} is negative ({limit})")
            state = self._state(rid)
            k = min(limit, self.options.num_speculative_tokens) if speculate else 0
            if state.backoff is not None:
                k = min(k, state.backoff.limit())
            state.last_proposal = state.index.draft(k)
            drafts.append(list(state.last_proposal))
        return drafts

    def extend(self, request_id: str, token_ids: Sequence[int]) -> None:
        state = self._state(request_id)
        proposal, state.last_proposal = state.last_proposal, []
        accepted = 0
        for drafted, kept in zip(proposal, token_ids):
            if drafted != kept:
                break
            accepted += 1
        state.num_proposed += len(proposal)
        state.num_accepted += accepted
        if state.backoff is not None:
            state.backoff.record(len(proposal), accepted)
        state.index.append(token_ids)

    def remove_request(self, request_id: str) -> None:
        self._state(request_id)
        del self._requests[request_id]

    # ---- introspection ---------------------------------------------------
    def acceptance(self, request_id: str) -> tuple[int, int]:
        """(drafts proposed, drafts accepted) so far for one request."""
        state = self._state(request_id)
        return state.num_proposed, state.num_accepted

    def _state(self, request_id: str) -> _RequestState:
        try:
            return self._requests[request_id]
        except KeyError:
            raise UnknownRequestError(f"unknown request id {request_id!r}: add_request() was not called for it "
                                      f"(or it was already removed)") from None
