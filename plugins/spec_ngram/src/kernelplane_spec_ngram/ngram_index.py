"""Per-request incremental n-gram index: same answers as ``match_rule.scan_draft``.

One dict maps every n-gram (a tuple, ``min_n <= n <= max_n``) to the latest
position right after an occurrence of it. Tuples of different lengths never
compare equal, so one dict serves every n. Appending a token adds one entry
per n (later occurrences overwrite earlier ones: the most recent wins);
looking up tries at most ``max_n - min_n + 1`` suffixes. Neither depends on
the context length.

An n-gram is indexed only once a token follows it, so the current suffix
never matches itself. Memory: about ``max_n - min_n + 1`` dict entries per
distinct n-gram (roughly 100 bytes each in CPython).
"""
from __future__ import annotations

from typing import Iterable

from .match_rule import continue_from


class NgramIndex:
    def __init__(self, min_n: int, max_n: int, tokens: Iterable[int] = ()):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._latest_end: dict[tuple[int, ...], int] = {}
        self.append(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, new_tokens: Iterable[int]) -> None:
        toks, latest = self.tokens, self._latest_end
        lo, hi = self.min_n, self.max_n
        for t in new_tokens:
            end = len(toks)  # the n-grams ending here now have a follower: t
            for n in range(lo, min(hi, end) + 1):
                latest[tuple(toks[end - n:end])] = end
            toks.append(t)

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens predicted to follow, or ``[]`` when no suffix recurs."""
        if k <= 0:
            return []
        toks = self.tokens
        length = len(toks)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = self._latest_end.get(tuple(toks[length - n:]))
            if end is not None:
                return continue_from(toks, end, k)
        return []
