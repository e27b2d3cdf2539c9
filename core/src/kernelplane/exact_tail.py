"""An exact tail beside a quantized KV cache: each running sequence's first
token and latest ``window`` tokens kept unquantized.

Most of a low-bit cache's damage comes from a few keys every query leans on:
the first token (where attention parks its unused weight) and the newest
tokens. Keeping those exact costs a fixed amount per running sequence, not
per token (measured on SmolLM2-135M with TurboQuant 4-bit K+V: +5.41 %
perplexity all quantized, +0.93 % with the first and latest 64 tokens exact;
see the quant_turboquant plugin's BENCHMARKS.md).

The pages still hold every token quantized; the tail is an overlay. The
ring holds position 0 and the sequence's latest ``capacity`` positions. A
query at position ``q`` reads key ``j`` exact when the ring holds ``j`` and
``j == 0`` or ``j > q - window``: a decoded token reads its own latest
``window`` tokens exact, and so does every token of a speculative
verification step (the ring is ``MAX_DRAFT_SLACK`` longer than the window),
so speculation changes no result; early tokens of a long prefill chunk read
their older keys from the pages. Everything else comes from the pages. A
backend that does not know the tail reads the pages alone and is merely
less accurate.

Layout: per layer, ``key``/``value`` ``[num_slots + 1, entries, heads, dim]``
where a slot is a running sequence (``AttentionMetadata.seq_slots``; the last
slot takes the CUDA-graph padding rows' writes). Entry 0 holds position 0;
position ``p >= 1`` lives in entry ``1 + p % capacity``. The writes of
rejected speculative drafts (positions past the sequence's end) only ever
overwrite entries older than any query's window. What the vectors are (raw, centred, rotated)
is the quantizer's choice: it decodes them for the reference path.

The arithmetic here is the definition; kernels repeat it and are tested
against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Speculative drafts per step are capped at 16 (EngineConfig.num_speculative_tokens).
MAX_DRAFT_SLACK = 16


@dataclass
class ExactTail:
    window: int  # latest tokens of a sequence read exact (besides position 0)
    key: torch.Tensor  # [num_slots + 1, entries, heads, head_dim]
    value: torch.Tensor  # [num_slots + 1, entries, heads, head_dim_v]

    @property
    def capacity(self) -> int:
        """Ring entries for positions >= 1."""
        return self.key.shape[1] - 1

    @property
    def scratch_slot(self) -> int:
        return self.key.shape[0] - 1

    @classmethod
    def allocate(cls, window: int, num_slots: int, num_kv_heads: int, head_dim: int, head_dim_v: int,
                 dtype: torch.dtype, device: torch.device | str) -> "ExactTail":
        if window < 1:
            raise ValueError(f"the exact tail window must be at least 1 token, got {window}")
        if num_slots < 1:
            raise ValueError(f"an exact tail needs at least one sequence slot, got {num_slots}")
        entries = cls.entries_for(window)
        # Zeros, not empty: entries no sequence has written yet are masked, but a 0 * NaN would still poison a sum.
        key = torch.zeros(num_slots + 1, entries, num_kv_heads, head_dim, dtype=dtype, device=device)
        value = torch.zeros(num_slots + 1, entries, num_kv_heads, head_dim_v, dtype=dtype, device=device)
        return cls(window, key, value)

    @staticmethod
    def entries_for(window: int) -> int:
        """Rows per slot: position 0, the window, and the drafts' slack."""
        return 1 + window + MAX_DRAFT_SLACK

    @classmethod
    def bytes_for(cls, window: int, num_slots: int, num_kv_heads: int, head_dim: int, head_dim_v: int,
                  dtype: torch.dtype) -> int:
        """One layer's tail, for sizing the cache before allocating it."""
        per = torch.empty(0, dtype=dtype).element_size()
        return (num_slots + 1) * cls.entries_for(window) * num_kv_heads * (head_dim + head_dim_v) * per

    def write_index(self, meta) -> torch.Tensor:
        """Flat entry (``slot * entries + entry``) for each of the step's tokens,
        int64 ``[T]``: position 0, and positions within ``capacity`` of the
        sequence's end, go to their entries; every other token to entry 0 of
        the scratch slot (written, never read). No host sync: graphs capture it.
        Computed once per step (``meta.derived``), shared by every layer."""
        key = ("exact_tail_index", self.capacity, self.scratch_slot)
        if key not in meta.derived:
            meta.derived[key] = self._write_index(meta)
        return meta.derived[key]

    def _write_index(self, meta) -> torch.Tensor:
        entries = self.capacity + 1
        starts = meta.query_start_loc.long()
        num_tokens = meta.slot_mapping.shape[0]
        token = torch.arange(num_tokens, device=starts.device)
        seq = torch.searchsorted(starts[1:], token, right=True).clamp_(max=meta.num_seqs - 1)
        seq_len = meta.seq_lens.long()[seq]
        pos = seq_len - (starts[seq + 1] - starts[seq]) + (token - starts[seq])
        entry = torch.where(pos == 0, 0, 1 + pos % self.capacity)
        kept = (pos == 0) | (pos >= seq_len - self.capacity)
        flat = meta.seq_slots.long()[seq] * entries + entry
        return torch.where(kept, flat, self.scratch_slot * entries)

    def write(self, meta, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the step's K/V ``[T, heads, dim]`` (already in the tail's form)."""
        index = self.write_index(meta)
        self.key.view(-1, *self.key.shape[2:]).index_copy_(0, index, key.to(self.key.dtype))
        self.value.view(-1, *self.value.shape[2:]).index_copy_(0, index, value.to(self.value.dtype))

    def entry_positions(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """Position held by each entry of each sequence, ``[B, entries]``
        (int64), or -1 where the entry holds nothing valid at these lengths."""
        cap = self.capacity
        seq_len = seq_lens.long()[:, None]
        entry = torch.arange(cap + 1, device=seq_lens.device)[None, :]
        newest_first = torch.remainder(seq_len - entry, cap)  # steps back from the last position
        pos = torch.where(entry == 0, 0, seq_len - 1 - newest_first)
        held = (entry == 0) | (pos >= torch.clamp(seq_len - cap, min=1))
        return torch.where(held & (pos >= 0), pos, -1)

    def reads_exact(self, key_pos: torch.Tensor, query_pos: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        """``[..., queries, keys]``: which held keys each query reads from the tail."""
        near = key_pos[..., None, :] > query_pos[..., :, None] - self.window
        return held[..., None, :] & ((key_pos[..., None, :] == 0) | near)
