"""The paged KV-cache layout every attention backend and KV quantizer shares.

A layer's cache is a set of tensors whose first two dims are
``[num_blocks, block_size]``: token ``t`` of a sequence lives in block
``block_table[t // block_size]`` at offset ``t % block_size``; its *slot* is
``block * block_size + offset``.

Plain formats (float32/float16/bfloat16) hold
``key: [num_blocks, block_size, num_kv_heads, head_dim]`` and
``value: [num_blocks, block_size, num_kv_heads, head_dim_v]``. MLA holds one
latent ``key: [num_blocks, block_size, 1, head_dim]`` and no ``value``: V is
``key[..., :head_dim_v]``. Quantized formats hold whatever tensors their
``KVQuantizer`` allocates and keep a reference to it in ``quantizer``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from .capabilities import PLAIN_KV_FORMATS

if TYPE_CHECKING:
    from .exact_tail import ExactTail
    from .interfaces import KVQuantizer

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(_TORCH_DTYPES)}") from None


@dataclass
class KVPages:
    """One layer's paged KV cache."""

    format: str
    block_size: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    tensors: dict[str, torch.Tensor]
    mla: bool = False
    quantizer: Optional["KVQuantizer"] = None
    # Quantized formats may keep each running sequence's first and latest tokens exact (exact_tail.py).
    exact_tail: Optional["ExactTail"] = None

    @property
    def key(self) -> torch.Tensor:
        return self.tensors["key"]

    @property
    def value(self) -> torch.Tensor:
        """V pages; for MLA a view of the latent's first ``head_dim_v`` channels."""
        if self.mla:
            return self.tensors["key"][..., : self.head_dim_v]
        return self.tensors["value"]

    @property
    def num_blocks(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def is_plain(self) -> bool:
        return self.format in PLAIN_KV_FORMATS

    def bytes_per_token(self) -> float:
        total = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return total / (self.num_blocks * self.block_size)


def allocate_plain_pages(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, head_dim_v: int,
    dtype: torch.dtype, device: torch.device | str, mla: bool = False,
) -> KVPages:
    key = torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    tensors = {"key": key}
    if not mla:
        tensors["value"] = torch.empty(num_blocks, block_size, num_kv_heads, head_dim_v, dtype=dtype, device=device)
    fmt = {v: k for k, v in _TORCH_DTYPES.items()}[dtype]
    return KVPages(fmt, block_size, num_kv_heads, head_dim, head_dim_v, tensors, mla=mla)


def plain_bytes_per_token(num_kv_heads: int, head_dim: int, head_dim_v: int, dtype: torch.dtype, mla: bool = False) -> int:
    per_elem = torch.empty(0, dtype=dtype).element_size()
    return num_kv_heads * (head_dim + (0 if mla else head_dim_v)) * per_elem


def write_plain(pages: KVPages, key: torch.Tensor, value: Optional[torch.Tensor], slot_mapping: torch.Tensor) -> None:
    """Scatter new tokens' K/V ([T, heads, dim]) into their slots."""
    flat_k = pages.tensors["key"].view(-1, pages.num_kv_heads, pages.head_dim)
    flat_k.index_copy_(0, slot_mapping, key.to(flat_k.dtype))
    if not pages.mla:
        flat_v = pages.tensors["value"].view(-1, pages.num_kv_heads, pages.head_dim_v)
        flat_v.index_copy_(0, slot_mapping, value.to(flat_v.dtype))


_placeholder_depth = 0


@contextlib.contextmanager
def placeholder_writes():
    """Marks K/V writes that carry no real tokens (the engine's CUDA-graph
    warm-up and capture write dummy rows into a scratch block). A quantizer
    that learns something from the data it first sees (an offset, a scale)
    must skip these writes: ``writing_placeholders()`` tells it."""
    global _placeholder_depth
    _placeholder_depth += 1
    try:
        yield
    finally:
        _placeholder_depth -= 1


def writing_placeholders() -> bool:
    return _placeholder_depth > 0


def write_kv(pages: KVPages, key: torch.Tensor, value: Optional[torch.Tensor], slot_mapping: torch.Tensor,
             meta: Optional["AttentionMetadata"] = None) -> None:
    """Write new tokens into a layer's cache, quantizing if its format asks for
    it, and into its exact tail where the step's ``meta`` gives sequence slots."""
    if pages.quantizer is None:
        write_plain(pages, key, value, slot_mapping)
        return
    if getattr(pages.quantizer, "writes_exact_tail", False):  # it fills the tail itself, e.g. in one kernel
        pages.quantizer.write(pages, key, value, slot_mapping, meta=meta)
        return
    pages.quantizer.write(pages, key, value, slot_mapping)
    if meta is not None and exact_tail_in_use(pages, meta) and key.shape[0]:
        to_tail = getattr(pages.quantizer, "to_exact_tail", None)
        pages.exact_tail.write(meta, *(to_tail(pages, key, value) if to_tail else (key, value)))


def exact_tail_kv(pages: KVPages, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence slot's exact tail as float32 K/V ``[entries, heads, dim]``."""
    tail = pages.exact_tail
    key, value = tail.key[slot], tail.value[slot]
    from_tail = getattr(pages.quantizer, "from_exact_tail", None)
    key, value = from_tail(pages, key, value) if from_tail else (key, value)
    return key.float(), value.float()


@dataclass
class AttentionMetadata:
    """Per-step batch description, built once by the engine and shared by all layers.

    The batch holds ``B`` sequences; sequence ``b`` contributes query tokens
    ``query_start_loc[b]:query_start_loc[b+1]`` (prefill, chunked prefill,
    one decode token, or several speculative tokens), and attends to
    ``seq_lens[b]`` cached tokens. The new tokens are already written to the
    cache and are its last ``q_len`` positions, so query ``i`` of sequence
    ``b`` sits at position ``seq_lens[b] - q_len + i``.
    """

    query_start_loc: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]
    block_tables: torch.Tensor  # int32 [B, max_blocks_per_seq]
    slot_mapping: torch.Tensor  # int64 [T]
    max_query_len: int
    max_seq_len: int
    # Host copies, so backends that loop on the CPU need no device sync.
    query_lens_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)
    # int32 [B]: a slot per running sequence, the same on every step of that
    # sequence (the engine assigns them). Per-sequence state such as an exact
    # tail lives there; None outside the engine, and then no such state is used.
    seq_slots: Optional[torch.Tensor] = None
    # Tensors derived from the fields above, computed by the first layer that
    # needs them and reused by the rest (a CUDA graph records them once).
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              block_size: int, device: torch.device | str = "cpu",
              seq_slots: Optional[list[int]] = None) -> "AttentionMetadata":
        """Build metadata from host lists (the engine and the tests use this)."""
        if len(query_lens) != len(seq_lens) or len(seq_lens) != len(block_tables):
            raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
        if seq_slots is not None and len(seq_slots) != len(seq_lens):
            raise ValueError(f"seq_slots has {len(seq_slots)} entries for {len(seq_lens)} sequences")
        starts = [0]
        slots: list[int] = []
        for q, s, table in zip(query_lens, seq_lens, block_tables):
            if q > s:
                raise ValueError(f"query length {q} exceeds sequence length {s}")
            if len(table) * block_size < s:
                raise ValueError(f"block table of {len(table)} blocks too short for {s} tokens")
            starts.append(starts[-1] + q)
            for pos in range(s - q, s):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=1) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(block_tables), width),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            seq_slots=None if seq_slots is None else torch.tensor(seq_slots, dtype=torch.int32, device=device),
        )


def exact_tail_in_use(pages: KVPages, meta: AttentionMetadata) -> bool:
    """Whether this step writes and reads ``pages.exact_tail``: only where the
    engine gave every sequence a slot."""
    return pages.exact_tail is not None and meta.seq_slots is not None


def check_kernel_inputs(query: torch.Tensor, pages: KVPages, meta: AttentionMetadata, request) -> None:
    """What a hand-written attention kernel relies on and cannot check itself:
    ``query`` [tokens, heads, head_dim] with a contiguous last dim, pages of
    the request's heads and head dims on the query's device, and int32
    metadata there, contiguous in its last dim. Raises ValueError naming the
    first mismatch. Format-specific checks stay with each backend."""
    if query.dim() != 3 or query.shape[1] != request.num_heads or query.shape[2] != request.head_dim:
        raise ValueError(f"query must be [tokens, {request.num_heads}, {request.head_dim}], got {tuple(query.shape)}")
    if query.stride(2) != 1:
        raise ValueError("query's last dim must be contiguous")
    if (pages.num_kv_heads != request.num_kv_heads or pages.head_dim != request.head_dim
            or pages.head_dim_v != request.v_dim):
        raise ValueError(f"KV pages hold {pages.num_kv_heads} heads of dims {pages.head_dim}/{pages.head_dim_v}; "
                         f"the request needs {request.num_kv_heads} heads of dims {request.head_dim}/{request.v_dim}")
    for name, t in pages.tensors.items():
        if t.device != query.device:
            raise ValueError(f"KV pages ({name}) are on {t.device}, query on {query.device}")
    for name in ("query_start_loc", "seq_lens", "block_tables"):
        t = getattr(meta, name)
        if t.dtype != torch.int32:
            raise ValueError(f"metadata {name} must be int32, got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"metadata {name} is on {t.device}, query on {query.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"metadata {name} must be contiguous in its last dim")
    if meta.query_start_loc.shape[0] != meta.num_seqs + 1:
        raise ValueError("metadata query_start_loc must have num_seqs + 1 entries")
