"""Draft-length back-off: stop paying for drafts a request keeps rejecting.

A rejected draft token still costs a slot in the verification forward. On
text with little repetition (open chat) n-gram matches are rare and mostly
wrong, so each request adapts how many drafts it may propose:

- ``allowance`` starts at ``k`` (``num_speculative_tokens``).
- After a verified step whose drafts were all accepted it doubles (capped
  at ``k``); a partly accepted step leaves it as it is; a step with no
  draft accepted halves it (rounding down).
- At 0 the request cools down: it proposes nothing for ``cooldown`` steps,
  then probes with a single draft. The cooldown starts at
  ``INITIAL_COOLDOWN`` steps and doubles, up to ``MAX_COOLDOWN``, each time
  a probe fails; any accepted draft resets it.

With ``k = 4``, three fully rejected steps in a row switch drafting off for
8 steps, then 16, 32 and 64 while probes keep failing. Steps without a
proposal (no n-gram match) change nothing except counting down a cooldown.
"""
from __future__ import annotations

INITIAL_COOLDOWN = 8
MAX_COOLDOWN = 64


class DraftBackoff:
    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.allowance = k
        self.cooldown = INITIAL_COOLDOWN
        self.cooling_steps_left = 0

    def limit(self) -> int:
        """How many drafts the request may propose now."""
        return 0 if self.cooling_steps_left else self.allowance

    def record(self, num_proposed: int, num_accepted: int) -> None:
        """One verified step: ``num_proposed`` drafts went in, ``num_accepted`` of them matched."""
        if not 0 <= num_accepted <= num_proposed:
            raise ValueError(f"accepted {num_accepted} of {num_proposed} proposed drafts")
        if self.cooling_steps_left:
            self.cooling_steps_left -= 1
            if not self.cooling_steps_left:
                self.allowance = 1  # probe
            return
        if num_proposed == 0:
            return
        if num_accepted:
            self.cooldown = INITIAL_COOLDOWN
        if num_accepted == num_proposed:
            self.allowance = min(self.k, 2 * self.allowance)
        elif num_accepted == 0:
            self.allowance //= 2
            if self.allowance == 0:
                self.cooling_steps_left = self.cooldown
                self.cooldown = min(MAX_COOLDOWN, 2 * self.cooldown)
