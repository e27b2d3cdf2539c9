"""Incremental detokenization with stop strings.

Decoding only a short window of recent tokens keeps each step O(1); text is
held back while it ends in an incomplete UTF-8 sequence or could still become
a stop string.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, new_ids: list[int]) -> None:
        """Append tokens; sets ``stopped`` (and trims ``text``) on a stop string."""
        self.ids.extend(new_ids)
        self._advance(final=False)

    def flush(self) -> None:
        """The request ended: bytes held back for an incomplete character become text after all."""
        if not self.stopped and self.read_offset < len(self.ids):
            self._advance(final=True)

    def _advance(self, final: bool) -> None:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") and not final:
            return  # an incomplete multi-byte character: wait for its other bytes
        start = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop:
            longest = max(map(len, self.stop))
            window_start = max(0, start - longest + 1)
            hits = [i for i in (self.text.find(s, window_start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def delta(self, final: bool) -> str:
        visible = len(self.text)
        if not final and self.stop:
            visible -= self._stop_prefix_len()
        out = self.text[self.emitted:visible]
        self.emitted = max(self.emitted, visible)
        return out

    def _stop_prefix_len(self) -> int:
        # Length of the longest text suffix that is a proper prefix of a stop string.
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
