"""The objects a provider's factory returns, one protocol per capability.

The engine calls these directly on the hot path: no hook dispatch per token.
Shapes use T = total query tokens in the batch, B = sequences.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence, runtime_checkable

import torch

from .kv_cache import AttentionMetadata, KVPages


@runtime_checkable
class AttentionBackend(Protocol):
    """Paged attention over the layout in ``kernelplane.kv_cache``."""

    def forward(self, query: torch.Tensor, pages: KVPages, meta: AttentionMetadata) -> torch.Tensor:
        """Attention for every query token of the batch.

        ``query``: ``[T, num_heads, head_dim]``. Returns ``[T, num_heads,
        head_dim_v]`` in the query's dtype. Causal masking (when the request
        says so) uses the positions defined by ``AttentionMetadata``; a
        sliding window ``w`` lets query at position p see keys in
        ``(p - w, p]``. Handles prefill, chunked prefill, decode and
        multi-token decode (speculative verification) in one call.
        """
        ...


@runtime_checkable
class KVQuantizer(Protocol):
    """A quantized KV-cache format: storage, quantize-on-write, dequantize."""

    format: str

    def bytes_per_token(self, num_kv_heads: int, head_dim: int, head_dim_v: int) -> float:
        """Real bytes one token occupies in one layer (K and V, scales included)."""
        ...

    def allocate(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 head_dim_v: int, device: torch.device | str) -> KVPages:
        """Empty pages in this format, with ``pages.quantizer = self``."""
        ...

    def write(self, pages: KVPages, key: torch.Tensor, value: Optional[torch.Tensor], slot_mapping: torch.Tensor) -> None:
        """Quantize ``key``/``value`` (``[T, heads, dim]``) into the given slots."""
        ...

    def dequantize(self, pages: KVPages, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given blocks as float tensors ``[n, block_size, heads, dim]``.

        The oracle path: reference attention dequantizes then attends.
        """
        ...

    # Optional, for formats that keep an exact tail (``exact_tail.py``) in a
    # form of their own; without them the tail holds K/V as written:
    #   to_exact_tail(pages, key, value) -> (key, value)    what the tail stores
    #   from_exact_tail(pages, key, value) -> (key, value)  back to K/V, float32
    # and ``writes_exact_tail = True`` where ``write`` takes ``meta=`` (the
    # step's AttentionMetadata) and fills ``pages.exact_tail`` itself.


@runtime_checkable
class MoEKernel(Protocol):
    def forward(self, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Mixture of experts with precomputed routing.

        ``hidden [T, H]``; ``w13 [E, 2*I, H]`` (gate rows then up rows);
        ``w2 [E, H, I]``; ``topk_weights [T, k]`` float32; ``topk_ids [T, k]``.
        Returns ``sum_j topk_weights[:, j] * expert_{topk_ids[:, j]}(hidden)``
        with ``expert(x) = w2 @ (act(w13_gate @ x) * (w13_up @ x))``.
        """
        ...


@runtime_checkable
class SpeculativeProposer(Protocol):
    """Proposes draft tokens per request; the engine verifies them exactly.

    Lifecycle per request: ``add_request`` once, then every step
    ``propose`` and, after verification, ``extend`` with the tokens actually
    accepted (drafts that matched plus the bonus token), then
    ``remove_request``. A proposer keeps whatever incremental index it needs.
    """

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int]) -> None: ...

    def extend(self, request_id: str, token_ids: Sequence[int]) -> None: ...

    def propose(self, request_ids: Sequence[str], max_tokens: Sequence[int]) -> list[list[int]]:
        """Up to ``max_tokens[i]`` draft token ids for each request (may be empty)."""
        ...

    def remove_request(self, request_id: str) -> None: ...
