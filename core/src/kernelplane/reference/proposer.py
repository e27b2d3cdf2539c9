"""The null proposer: proposes nothing, so the engine runs without speculation
through the same code path."""
from __future__ import annotations

from typing import Sequence


class NullProposer:
    def __init__(self, request=None):
        self.request = request

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int]) -> None:
        pass

    def extend(self, request_id: str, token_ids: Sequence[int]) -> None:
        pass

    def propose(self, request_ids: Sequence[str], max_tokens: Sequence[int]) -> list[list[int]]:
        return [[] for _ in request_ids]

    def remove_request(self, request_id: str) -> None:
        pass
