"""The n-gram proposer's settings, read from a ``SpecRequest``.

``SpecRequest.options`` may hold:

- ``prompt_lookup_min`` (default 2): the shortest suffix worth matching.
- ``prompt_lookup_max`` (default 4): the longest suffix tried first.
- ``backoff`` (default true): cut drafts for requests whose drafts keep
  being rejected (see ``backoff.py``).
- ``disable_by_batch_size`` (default none): propose nothing while more than
  this many requests are decoding (the name vLLM uses). Verification costs
  more at large batches, where drafts stop paying.

The older spellings ``ngram_prompt_lookup_min`` / ``ngram_prompt_lookup_max``
are accepted too. When only one bound is given and it crosses the other's
default, the other follows it (``prompt_lookup_min=5`` alone means 5..5).
The number of drafts comes from ``SpecRequest.num_speculative_tokens``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

DEFAULT_MIN_N = 2
DEFAULT_MAX_N = 4
# Each indexed token costs one dict entry per n in [min, max]: keep n small.
LIMIT_MAX_N = 64

_ALIASES = {
    "prompt_lookup_min": "prompt_lookup_min",
    "ngram_prompt_lookup_min": "prompt_lookup_min",
    "prompt_lookup_max": "prompt_lookup_max",
    "ngram_prompt_lookup_max": "prompt_lookup_max",
    "backoff": "backoff",
    "disable_by_batch_size": "disable_by_batch_size",
}


@dataclass(frozen=True)
class NgramOptions:
    min_n: int = DEFAULT_MIN_N
    max_n: int = DEFAULT_MAX_N
    num_speculative_tokens: int = 3
    backoff: bool = True
    disable_by_batch_size: Optional[int] = None

    def __post_init__(self):
        for name, value in (("prompt_lookup_min", self.min_n), ("prompt_lookup_max", self.max_n),
                            ("num_speculative_tokens", self.num_speculative_tokens)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_n > LIMIT_MAX_N:
            raise ValueError(f"prompt_lookup_max {self.max_n} is above the limit of {LIMIT_MAX_N}")
        if self.min_n > self.max_n:
            raise ValueError(f"prompt_lookup_min {self.min_n} is greater than prompt_lookup_max {self.max_n}")
        if not isinstance(self.backoff, bool):
            raise ValueError(f"backoff must be true or false, got {self.backoff!r}")
        limit = self.disable_by_batch_size
        if limit is not None and (not _is_int(limit) or limit < 1):
            raise ValueError(f"disable_by_batch_size must be an integer >= 1 (or null), got {limit!r}")

    @classmethod
    def from_request(cls, request: Any) -> "NgramOptions":
        """Options of a ``SpecRequest``; raises ``ValueError`` naming any bad one."""
        given = _canonical(getattr(request, "options", None) or {})
        lo, hi = given.get("prompt_lookup_min"), given.get("prompt_lookup_max")
        for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if lo is None:
            lo = DEFAULT_MIN_N if hi is None else min(DEFAULT_MIN_N, hi)
        if hi is None:
            hi = max(DEFAULT_MAX_N, lo)
        return cls(min_n=lo, max_n=hi, num_speculative_tokens=getattr(request, "num_speculative_tokens", 3),
                   backoff=given.get("backoff", True), disable_by_batch_size=given.get("disable_by_batch_size"))


def _canonical(options: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(options, Mapping):
        raise ValueError(f"ngram options must be a mapping, got {type(options).__name__}")
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = _ALIASES.get(key)
        if name is None:
            raise ValueError(f"unknown ngram option {key!r} (known: {', '.join(sorted(_ALIASES))})")
        if name in out and out[name] != value:
            raise ValueError(f"ngram option {name} is given twice with different values ({out[name]!r} and {value!r})")
        out[name] = value
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
