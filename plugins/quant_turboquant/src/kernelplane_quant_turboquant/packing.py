"""Bit-packing of b-bit codes (b = 1..4) into bytes, in a planar layout.

A row of ``dim`` codes is split by bits into parts of 4, 2 or 1 bits (3 bits
= a 2-bit part then a 1-bit part; others are one part). A part of p bits
takes ``dim * p / 8`` bytes, each holding ``8 / p`` fields: code ``j``'s
field sits in byte ``j % part_bytes`` at bit ``p * (j // part_bytes)``.
So consecutive codes sit in consecutive bytes, and a kernel that wants code
``j`` loads byte ``j % part_bytes`` of each part (contiguous, vectorizable)
and shifts by a per-column constant. A row takes exactly ``dim * b / 8`` bytes.
"""
from __future__ import annotations

import torch

_PARTS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,)}


def parts(bits: int) -> tuple[int, ...]:
    """Bit widths of the parts, lowest code bits first."""
    try:
        return _PARTS[bits]
    except KeyError:
        raise ValueError(f"packing supports 1..4 bits per code, got {bits!r}") from None


def packed_bytes(dim: int, bits: int) -> int:
    check_dim(dim)
    return dim * bits // 8 if bits != 3 else dim // 4 + dim // 8


def check_dim(dim: int) -> None:
    if dim <= 0 or dim % 8:
        raise ValueError(f"packed dim must be a positive multiple of 8, got {dim}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (integers in [0, 2**bits), last dim ``dim``) -> uint8 ``[..., packed_bytes]``."""
    dim = codes.shape[-1]
    check_dim(dim)
    codes = codes.to(torch.int32)
    out = []
    low = 0
    for p in parts(bits):
        field = (codes >> low) & ((1 << p) - 1)
        width = dim * p // 8
        field = field.reshape(*codes.shape[:-1], 8 // p, width)  # [..., fields per byte, bytes]
        shifts = (torch.arange(8 // p, device=codes.device, dtype=torch.int32) * p)[:, None]
        out.append((field << shifts).sum(dim=-2).to(torch.uint8))
        low += p
    return torch.cat(out, dim=-1) if len(out) > 1 else out[0]


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 ``[..., packed_bytes]`` -> int64 codes ``[..., dim]``."""
    if packed.shape[-1] != packed_bytes(dim, bits):
        raise ValueError(f"expected {packed_bytes(dim, bits)} bytes per row for {dim} codes of {bits} bits, "
                         f"got {packed.shape[-1]}")
    data = packed.to(torch.int64)
    codes = torch.zeros(*packed.shape[:-1], dim, dtype=torch.int64, device=packed.device)
    start = low = 0
    for p in parts(bits):
        width = dim * p // 8
        region = data[..., start:start + width]
        shifts = (torch.arange(8 // p, device=packed.device) * p)[:, None]
        field = (region.unsqueeze(-2) >> shifts) & ((1 << p) - 1)  # [..., fields per byte, bytes]
        codes |= field.reshape(*packed.shape[:-1], dim) << low
        start += width
        low += p
    return codes
