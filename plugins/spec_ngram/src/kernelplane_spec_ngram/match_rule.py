"""The matching rule, stated once, with the plain O(length) scan that defines it.

Given the tokens so far (prompt + output), a suffix length range
``[min_n, max_n]`` and a draft length ``k``:

1. Longest match wins: try ``n = max_n`` down to ``min_n``; the first ``n``
   whose last ``n`` tokens occurred earlier decides.
2. Most recent match wins: among the earlier occurrences of that suffix,
   take the one that ends last (vLLM takes the earliest instead; the most
   recent follows the text the model is currently copying, and a loop's
   latest period). The suffix itself never counts: an occurrence must be
   followed by at least one token.
3. The draft is the ``k`` tokens that followed the occurrence. When that
   runs past the end of the known tokens it continues with the draft's own
   tokens, i.e. it repeats with period ``length - end``: ``[7, 7, 7]`` with
   ``n = 2`` drafts ``[7, 7, 7, ...]``, not just one ``7``.

``scan_draft`` is the reference: it rescans the whole context each call.
``NgramIndex`` gives the same answers from an incremental index.
"""
from __future__ import annotations

from typing import Sequence


def continue_from(tokens: Sequence[int], end: int, k: int) -> list[int]:
    """The ``k`` tokens after position ``end``, repeating periodically past the last known one."""
    length = len(tokens)
    draft: list[int] = []
    for i in range(k):
        pos = end + i
        draft.append(tokens[pos] if pos < length else draft[pos - length])
    return draft


def scan_draft(tokens: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The draft by a full backwards scan (O(length * n) per call)."""
    length = len(tokens)
    if k <= 0:
        return []
    for n in range(max_n, min_n - 1, -1):
        if n > length - 1:  # an earlier occurrence needs n tokens and one after it
            continue
        suffix = list(tokens[length - n:])
        for end in range(length - 1, n - 1, -1):
            if list(tokens[end - n:end]) == suffix:
                return continue_from(tokens, end, k)
    return []
