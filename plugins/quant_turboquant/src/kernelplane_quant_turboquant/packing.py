"""Bit-packing of b-bit codes (b = 1..4) into bytes, laid out for the kernel.

A row of ``dim`` codes is cut into ``F`` fields of ``dim / F`` consecutive
codes (``F = 8 / m`` with ``m`` the main bits: 4 for b = 4, 2 for b = 2 and 3,
1 for b = 1). The main part is ``dim / F`` bytes: byte ``i`` holds, at bits
``m*f .. m*f + m - 1``, the low ``m`` bits of code ``j = f * dim/F + i``. So
every byte (and every 32-bit word) of the main part carries one code of each
field, the codes of one field sit at the same bit offset everywhere, and a
kernel decodes field ``f`` of a whole row with one constant shift.

3-bit codes add an extra part of ``dim / 8`` bytes with their top bit: for
``j = f * dim/4 + i``, byte ``i % (dim/8)``, bit ``2f + i // (dim/8)``; in
32-bit words, main word ``w`` finds its top bits in extra word
``w % (W/2)`` (``W`` main words), at a bit offset uniform over its 4 bytes.
A row takes exactly ``dim * b / 8`` bytes.
"""
from __future__ import annotations

import torch

_MAIN_BITS = {1: 1, 2: 2, 3: 2, 4: 4}


def main_bits(bits: int) -> int:
    try:
        return _MAIN_BITS[bits]
    except KeyError:
        raise ValueError(f"packing supports 1..4 bits per code, got {bits!r}") from None


def num_fields(bits: int) -> int:
    return 8 // main_bits(bits)


def packed_bytes(dim: int, bits: int) -> int:
    check_dim(dim, bits)
    return dim * bits // 8


def check_dim(dim: int, bits: int = 2) -> None:
    if dim <= 0 or dim % 32:
        raise ValueError(f"packed dim must be a positive multiple of 32, got {dim}")
    main_bits(bits)


def _field_major(codes: torch.Tensor, fields: int) -> torch.Tensor:
    """``[..., dim]`` -> ``[..., fields, dim / fields]``."""
    return codes.reshape(*codes.shape[:-1], fields, codes.shape[-1] // fields)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (integers in [0, 2**bits), last dim ``dim``) -> uint8 ``[..., packed_bytes]``."""
    dim = codes.shape[-1]
    check_dim(dim, bits)
    m, fields = main_bits(bits), num_fields(bits)
    codes = codes.to(torch.int32)
    shifts = (torch.arange(fields, device=codes.device, dtype=torch.int32) * m)[:, None]
    main = (_field_major(codes & ((1 << m) - 1), fields) << shifts).sum(dim=-2)  # [..., dim / F]
    parts = [main.to(torch.uint8)]
    if bits == 3:
        top = _field_major(codes >> 2, 4)  # [..., 4, dim/4]; byte i % (dim/8), bit 2f + i // (dim/8)
        top = top.reshape(*top.shape[:-1], 2, dim // 8)  # [..., f, half, byte]
        bit = (2 * torch.arange(4, device=codes.device, dtype=torch.int32)[:, None] +
               torch.arange(2, device=codes.device, dtype=torch.int32)[None, :])[..., None]
        parts.append((top << bit).sum(dim=(-3, -2)).to(torch.uint8))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 ``[..., packed_bytes]`` -> int64 codes ``[..., dim]``."""
    if packed.shape[-1] != packed_bytes(dim, bits):
        raise ValueError(f"expected {packed_bytes(dim, bits)} bytes per row for {dim} codes of {bits} bits, "
                         f"got {packed.shape[-1]}")
    m, fields = main_bits(bits), num_fields(bits)
    data = packed.to(torch.int64)
    lead = packed.shape[:-1]
    shifts = (torch.arange(fields, device=packed.device) * m)[:, None]
    main = data[..., : dim // fields]
    codes = ((main.unsqueeze(-2) >> shifts) & ((1 << m) - 1)).reshape(*lead, dim)
    if bits == 3:
        extra = data[..., dim // 4:]  # [..., dim/8]
        bit = (2 * torch.arange(4, device=packed.device)[:, None] + torch.arange(2, device=packed.device)[None, :])
        top = (extra[..., None, None, :] >> bit[..., None]) & 1  # [..., f, half, byte]
        codes = codes | (top.reshape(*lead, dim) << 2)
    return codes
