"""KV-quantizer conformance: round trips, slot isolation, honest byte counts."""
from __future__ import annotations

import pytest
import torch

from ..capabilities import KVQuantRequest
from ..kv_cache import AttentionMetadata
from ._common import ConformanceBase, build_or_skip, relative_error, test_device


def check_kv_quantizer(provider_name: str, fmt: str, max_relative_error: float, head_dim: int = 64,
                       num_kv_heads: int = 2, block_size: int = 16, seed: int = 0) -> None:
    device = test_device()
    gen = torch.Generator().manual_seed(seed)
    request = KVQuantRequest(format=fmt, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype="float32", block_size=block_size)
    quantizer = build_or_skip("kv_quantizer", provider_name, request)
    num_blocks = 6
    pages = quantizer.allocate(num_blocks, block_size, num_kv_heads, head_dim, head_dim, device)
    assert pages.quantizer is quantizer, "allocate() must set pages.quantizer to itself"
    assert pages.num_blocks == num_blocks and pages.block_size == block_size

    # Two sequences on shuffled blocks; the second write must not disturb the first.
    order = torch.randperm(num_blocks, generator=gen).tolist()
    meta = AttentionMetadata.build([37, 20], [37, 20], [order[:3], order[3:5]], block_size, device)
    n1 = 37
    key = (torch.randn(57, num_kv_heads, head_dim, generator=gen) * torch.rand(57, num_kv_heads, 1, generator=gen) * 4).to(device)
    value = torch.randn(57, num_kv_heads, head_dim, generator=gen).to(device)
    quantizer.write(pages, key[:n1], value[:n1], meta.slot_mapping[:n1])
    blocks = torch.tensor(order[:3], device=device)
    first = slice(0, n1)  # the first sequence fills its 3 blocks in order, up to token n1

    def stored():
        return torch.cat([t.reshape(-1, num_kv_heads, head_dim)[first] for t in quantizer.dequantize(pages, blocks)])

    before = stored()
    quantizer.write(pages, key[n1:], value[n1:], meta.slot_mapping[n1:])
    assert torch.equal(before, stored()), "writing other slots changed stored tokens"

    k_deq, v_deq = quantizer.dequantize(pages, torch.tensor(order[:5], device=device))
    assert k_deq.shape == (5, block_size, num_kv_heads, head_dim), f"dequantize shape {tuple(k_deq.shape)}"
    slots = meta.slot_mapping
    pos_of_slot = {s: i for i, s in enumerate(slots.tolist())}
    flat_index = []
    for b_i, blk in enumerate(order[:5]):
        for off in range(block_size):
            flat_index.append(pos_of_slot.get(blk * block_size + off, -1))
    idx = torch.tensor(flat_index, device=device)
    written = idx >= 0
    k_flat = k_deq.reshape(-1, num_kv_heads, head_dim)[written]
    v_flat = v_deq.reshape(-1, num_kv_heads, head_dim)[written]
    err_k = relative_error(k_flat, key[idx[written]])
    err_v = relative_error(v_flat, value[idx[written]])
    assert err_k <= max_relative_error, f"{fmt}: key relative error {err_k:.3e} > {max_relative_error:.1e}"
    assert err_v <= max_relative_error, f"{fmt}: value relative error {err_v:.3e} > {max_relative_error:.1e}"

    allocated = pages.bytes_per_token()
    claimed = quantizer.bytes_per_token(num_kv_heads, head_dim, head_dim)
    assert abs(allocated - claimed) <= 0.05 * claimed, f"bytes_per_token() says {claimed}, pages hold {allocated:.1f} per token"


class KVQuantizerConformance(ConformanceBase):
    """Set ``provider_name`` and ``formats``: {format: max relative round-trip error}."""

    capability = "kv_quantizer"
    formats: dict[str, float] = {}

    def test_round_trip(self, provider):
        if not self.formats:
            pytest.skip("no formats listed for this quantizer")
        for fmt, tol in self.formats.items():
            for head_dim in (64, 128):
                check_kv_quantizer(provider, fmt, tol, head_dim=head_dim)
