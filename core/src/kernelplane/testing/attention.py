"""Attention conformance: random paged caches, compared with the reference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from ..capabilities import PLAIN_KV_FORMATS, AttentionRequest, KVQuantRequest
from ..kv_cache import AttentionMetadata, KVPages, allocate_plain_pages, torch_dtype, write_kv
from ..reference.attention import ReferenceAttention
from ..selection import select
from ._common import REL_TOL, ConformanceBase, assert_close, build_or_skip, run_each_dtype, test_device


@dataclass(frozen=True)
class AttentionCase:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    head_dim_v: Optional[int] = None
    block_size: int = 16
    sliding_window: Optional[int] = None
    kind: str = "mha"
    causal: bool = True

    def __str__(self) -> str:
        return self.name


# Small shapes (they also run under the Triton interpreter) that still cover
# ragged batches, page crossings, single tokens, GQA ratios and MLA dims.
ATTENTION_CASES = [
    AttentionCase("decode_mha_ragged", 4, 4, 64, (1, 1, 1), (1, 17, 40)),
    AttentionCase("decode_gqa2", 4, 2, 64, (1, 1), (33, 5)),
    AttentionCase("decode_mqa_d128", 8, 1, 128, (1, 1, 1), (16, 32, 70)),
    AttentionCase("prefill_varlen", 4, 2, 64, (5, 17, 1), (5, 17, 1)),
    AttentionCase("chunked_prefill", 4, 2, 64, (7, 3), (40, 19)),
    AttentionCase("multi_token_decode_gqa4", 8, 2, 128, (4, 2, 1), (30, 17, 9)),
    AttentionCase("mixed_batch_gqa4", 4, 1, 64, (1, 12, 1, 3), (50, 12, 3, 20)),
    AttentionCase("page_64", 4, 2, 64, (1, 20), (130, 20), block_size=64),
    AttentionCase("head_dim_256", 2, 1, 256, (1, 6), (20, 6)),
    AttentionCase("sliding_window", 4, 2, 64, (1, 9), (45, 30), sliding_window=8),
    AttentionCase("value_dim_differs", 4, 2, 128, (1, 5), (21, 5), head_dim_v=64),
    AttentionCase("mla_latent", 4, 1, 80, (1, 5), (20, 5), head_dim_v=64, kind="mla"),
]


def _make_pages(request: AttentionRequest, num_blocks: int, device) -> KVPages:
    fmt = request.resolved_kv_format
    if fmt in PLAIN_KV_FORMATS:
        pages = allocate_plain_pages(num_blocks, request.block_size, request.num_kv_heads, request.head_dim,
                                     request.v_dim, torch_dtype(fmt), device, mla=request.kind == "mla")
        # NaN everywhere, as an engine's uninitialized cache may hold: reading an
        # unwritten slot, even with zero attention weight (0 * NaN), shows up.
        for t in pages.tensors.values():
            t.fill_(float("nan"))
        return pages
    quantizer = select("kv_quantizer", KVQuantRequest(
        format=fmt, num_kv_heads=request.num_kv_heads, head_dim=request.head_dim, head_dim_v=request.head_dim_v,
        kind=request.kind, dtype=request.dtype, block_size=request.block_size)).implementation
    return quantizer.allocate(num_blocks, request.block_size, request.num_kv_heads, request.head_dim, request.v_dim, device)


def make_inputs(case: AttentionCase, dtype: str, kv_cache_format: str = "auto", seed: int = 0, device=None):
    """A request, a filled paged cache, metadata and queries for one case."""
    device = device or test_device()
    gen = torch.Generator().manual_seed(seed)
    request = AttentionRequest(kind=case.kind, num_heads=case.num_heads, num_kv_heads=case.num_kv_heads,
                               head_dim=case.head_dim, head_dim_v=case.head_dim_v, dtype=dtype,
                               kv_cache_format=kv_cache_format, block_size=case.block_size,
                               causal=case.causal, sliding_window=case.sliding_window)
    bs = case.block_size
    need = [(s + bs - 1) // bs for s in case.seq_lens]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()  # non-contiguous, shuffled pages
    tables, at = [], 0
    for n in need:
        tables.append(order[at:at + n])
        at += n
    pages = _make_pages(request, num_blocks, device)
    tdtype = torch_dtype(dtype)
    # Write every position of every sequence (prefix and new tokens) with fresh values.
    all_meta = AttentionMetadata.build(list(case.seq_lens), list(case.seq_lens), tables, bs, device)
    total = sum(case.seq_lens)
    key = torch.randn(total, case.num_kv_heads, case.head_dim, generator=gen).to(device, tdtype)
    value = None if case.kind == "mla" else torch.randn(total, case.num_kv_heads, request.v_dim, generator=gen).to(device, tdtype)
    write_kv(pages, key, value, all_meta.slot_mapping)
    meta = AttentionMetadata.build(list(case.query_lens), list(case.seq_lens), tables, bs, device)
    query = torch.randn(sum(case.query_lens), case.num_heads, case.head_dim, generator=gen).to(device, tdtype)
    return request, pages, meta, query


def check_attention(provider_name: str, case: AttentionCase, dtype: str, kv_cache_format: str = "auto",
                    seed: int = 0, tolerance: Optional[float] = None) -> None:
    """Raise AssertionError if the provider's output differs from the reference."""
    request, pages, meta, query = make_inputs(case, dtype, kv_cache_format, seed)
    backend = build_or_skip("attention", provider_name, request)
    reference = ReferenceAttention(request).forward(query.float(), pages, meta)
    out = backend.forward(query, pages, meta)
    assert out.dtype == query.dtype, f"{case}: output dtype {out.dtype} != query dtype {query.dtype}"
    tol = tolerance if tolerance is not None else REL_TOL[query.dtype]
    assert_close(out.float(), reference, tol, f"{provider_name} on {case} ({dtype})")


class AttentionConformance(ConformanceBase):
    """Subclass and set ``provider_name``; optionally narrow ``dtypes`` or set
    ``kv_cache_format`` (a quantized format) and ``tolerance``."""

    capability = "attention"
    dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32")
    kv_cache_format: str = "auto"
    tolerance: Optional[float] = None
    seeds: tuple[int, ...] = (0,)

    @pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
    def test_matches_reference(self, provider, case):
        run_each_dtype(self.dtypes, lambda dtype: [
            check_attention(provider, case, dtype, self.kv_cache_format, seed, self.tolerance) for seed in self.seeds])
