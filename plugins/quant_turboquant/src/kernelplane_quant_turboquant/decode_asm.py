"""PTX that decodes codes into float16 centroids, four elements per call.

Used by the kernel's ``LOOKUP == 2`` path (NVIDIA GPUs; Triton's CPU
interpreter cannot run PTX, so the tests there use the portable decoders,
run this PTX text through a small simulator of the instructions it uses,
and the GPU benchmark checks the kernel against the reference).

Triton's ``inline_asm_elementwise(pack=4)`` hands one call four elements that
are consecutive in a thread's registers, which in the layouts the compiler
picks for matrix operands are not four bytes of one word. So every element
carries its own word and its own shift, and the call only shares the table
lookup: ``prmt`` picks bytes out of two registers by 4-bit selectors, so a
table of up to eight float16 values lives in four registers (low bytes,
high bytes) and one ``prmt`` looks up two (2 bits) or four (3 and 4 bits)
values at once.

Operands: ``$0, $1`` the four float16 results (two per register, element 0
in the low half); then, four registers each (elements 0..3): the main word
and its shift; for 3 bits also the extra word and its shift.
"""
from __future__ import annotations

import struct

import torch


def _half_bits(values: list[float]) -> list[int]:
    return [struct.unpack("<H", struct.pack("<e", v))[0] for v in values]


def _word(byte_values: list[int]) -> str:
    return "0x%08x" % sum(b << (8 * i) for i, b in enumerate(byte_values))


def _byte_tables(values: list[float]) -> tuple[list[str], list[str]]:
    """Immediates holding the low and the high bytes of float16 values, 4 per register."""
    bits = _half_bits(values)
    lows = [_word([b & 0xFF for b in bits[i:i + 4]]) for i in range(0, len(bits), 4)]
    highs = [_word([b >> 8 for b in bits[i:i + 4]]) for i in range(0, len(bits), 4)]
    return lows, highs


def _extract(bits: int) -> str:
    """PTX putting element i's code in register u{i}."""
    mask = 15 if bits == 4 else 3
    lines = []
    for i in range(4):
        lines += [f"shr.b32 u{i}, ${2 + i}, ${(10 if bits == 3 else 6) + i};", f"and.b32 u{i}, u{i}, {mask};"]
        if bits == 3:  # top bit from the extra word: u |= ((extra >> shift) & 1) << 2
            lines += [f"shr.b32 e, ${6 + i}, ${14 + i};", "and.b32 e, e, 1;", f"mad.lo.u32 u{i}, e, 4, u{i};"]
    return "\n".join(lines)


def decode_asm(bits: int, table: torch.Tensor) -> str:
    """PTX for one codebook; ``table[code]`` in sign-magnitude code order."""
    values = [float(v) for v in table.tolist()]
    if bits == 2:
        return _two_bit(values)
    if bits == 3:
        return _three_bit(values)
    if bits == 4:
        return _four_bit(values[:8])  # magnitudes; the sign comes from bit 3
    raise ValueError(f"no PTX decoder for {bits}-bit codes")


def _two_bit(values: list[float]) -> str:
    (lo,), (hi,) = _byte_tables(values)
    # Selector nibbles (u, u + 4) pick the low and the high byte of table[u]:
    # (u0 | u1 << 8) * 0x11 + 0x4040 builds two of them at once.
    return f"""{{
.reg .b32 u0, u1, u2, u3, a, b, tl, th;
mov.b32 tl, {lo};
mov.b32 th, {hi};
{_extract(2)}
mad.lo.u32 a, u1, 256, u0;
mad.lo.u32 a, a, 17, 0x4040;
mad.lo.u32 b, u3, 256, u2;
mad.lo.u32 b, b, 17, 0x4040;
prmt.b32 $0, tl, th, a;
prmt.b32 $1, tl, th, b;
}}"""


def _three_bit(values: list[float]) -> str:
    (lo0, lo1), (hi0, hi1) = _byte_tables(values)
    # Selector nibbles u0..u3 pick four low bytes, then four high bytes; two
    # more prmt interleave them into (low, high) pairs.
    return f"""{{
.reg .b32 u0, u1, u2, u3, e, s, l, h, t0, t1, v0, v1;
mov.b32 t0, {lo0};
mov.b32 t1, {lo1};
mov.b32 v0, {hi0};
mov.b32 v1, {hi1};
{_extract(3)}
mad.lo.u32 s, u1, 16, u0;
mad.lo.u32 s, u2, 256, s;
mad.lo.u32 s, u3, 4096, s;
prmt.b32 l, t0, t1, s;
prmt.b32 h, v0, v1, s;
prmt.b32 $0, l, h, 0x5140;
prmt.b32 $1, l, h, 0x7362;
}}"""


def _four_bit(magnitudes: list[float]) -> str:
    (lo0, lo1), (hi0, hi1) = _byte_tables(magnitudes)
    # As 3 bits on the low 3 bits; bit 3 of each code becomes the sign bit of its high byte.
    return f"""{{
.reg .b32 u0, u1, u2, u3, s, g, l, h, m, t0, t1, v0, v1;
mov.b32 t0, {lo0};
mov.b32 t1, {lo1};
mov.b32 v0, {hi0};
mov.b32 v1, {hi1};
{_extract(4)}
mad.lo.u32 g, u1, 256, u0;
mad.lo.u32 g, u2, 65536, g;
mad.lo.u32 g, u3, 16777216, g;
and.b32 m, g, 0x07070707;
shr.b32 s, m, 4;
or.b32 s, s, m;
prmt.b32 s, s, s, 0x0020;
prmt.b32 l, t0, t1, s;
prmt.b32 h, v0, v1, s;
shl.b32 g, g, 4;
and.b32 g, g, 0x80808080;
or.b32 h, h, g;
prmt.b32 $0, l, h, 0x5140;
prmt.b32 $1, l, h, 0x7362;
}}"""
