"""PTX that decodes four codes of a 32-bit word into four float16 centroids.

Used by the kernel's ``LOOKUP == 2`` path (NVIDIA GPUs; Triton's CPU
interpreter cannot run PTX, so the tests there use the portable decoders and
the GPU benchmark checks this one against the reference; tests run the
PTX text through a small simulator of the few instructions it uses). ``prmt`` picks
bytes out of two registers by 4-bit selectors, so a table of up to eight
float16 values lives in four registers (low bytes, high bytes) and one
``prmt`` looks up four bytes at once:

- 2 bits: codes -> selectors with one multiply-add (``x * 0x11 + 0x4040``
  turns codes u0, u1 into the nibbles u0, u0+4, u1, u1+4), and one ``prmt``
  yields two float16 values straight away.
- 3 bits: the four 3-bit codes are gathered into the four nibbles of a
  selector; one ``prmt`` each for the low and the high bytes, two to
  interleave them.
- 4 bits: as 3 bits on the magnitude; the sign bit is OR-ed into each high byte.

Operands (Triton ``inline_asm_elementwise`` with ``pack=4``; every input is a
32-bit value broadcast over the 4 packed elements, so only its first copy is
read): ``$0, $1`` the four float16 results; then the main word and its
field shift; for 3 bits also the extra word and its shift.
"""
from __future__ import annotations

import struct

import torch


def _half_bits(values: list[float]) -> list[int]:
    return [struct.unpack("<H", struct.pack("<e", v))[0] for v in values]


def _word(byte_values: list[int]) -> str:
    assert len(byte_values) == 4
    return "0x%08x" % sum(b << (8 * i) for i, b in enumerate(byte_values))


def _byte_tables(values: list[float]) -> tuple[list[str], list[str]]:
    """Registers (as immediates) holding the low and the high bytes of float16 values, 4 per register."""
    bits = _half_bits(values)
    lows = [_word([b & 0xFF for b in bits[i:i + 4]]) for i in range(0, len(bits), 4)]
    highs = [_word([b >> 8 for b in bits[i:i + 4]]) for i in range(0, len(bits), 4)]
    return lows, highs


def decode_asm(bits: int, table: torch.Tensor) -> str:
    """PTX for one codebook; ``table[code]`` in sign-magnitude code order."""
    values = [float(v) for v in table.tolist()]
    if bits == 2:
        (lo,), (hi,) = _byte_tables(values)
        return f"""{{
.reg .b32 w, a, b, tl, th;
mov.b32 tl, {lo};
mov.b32 th, {hi};
shr.b32 w, $2, $6;
and.b32 a, w, 0x0303;
shr.b32 b, w, 16;
and.b32 b, b, 0x0303;
mad.lo.u32 a, a, 17, 0x4040;
mad.lo.u32 b, b, 17, 0x4040;
prmt.b32 $0, tl, th, a;
prmt.b32 $1, tl, th, b;
}}"""
    if bits == 3:
        (lo0, lo1), (hi0, hi1) = _byte_tables(values)
        return f"""{{
.reg .b32 c, e, s, l, h, t0, t1, u0, u1;
mov.b32 t0, {lo0};
mov.b32 t1, {lo1};
mov.b32 u0, {hi0};
mov.b32 u1, {hi1};
shr.b32 c, $2, $10;
and.b32 c, c, 0x03030303;
shr.b32 e, $6, $14;
and.b32 e, e, 0x01010101;
shl.b32 e, e, 2;
or.b32 c, c, e;
shr.b32 s, c, 4;
or.b32 s, s, c;
prmt.b32 s, s, s, 0x0020;
prmt.b32 l, t0, t1, s;
prmt.b32 h, u0, u1, s;
prmt.b32 $0, l, h, 0x5140;
prmt.b32 $1, l, h, 0x7362;
}}"""
    if bits == 4:
        (lo0, lo1), (hi0, hi1) = _byte_tables(values[:8])  # magnitudes; sign from bit 3
        return f"""{{
.reg .b32 c, m, s, g, l, h, t0, t1, u0, u1;
mov.b32 t0, {lo0};
mov.b32 t1, {lo1};
mov.b32 u0, {hi0};
mov.b32 u1, {hi1};
shr.b32 c, $2, $6;
and.b32 c, c, 0x0f0f0f0f;
and.b32 m, c, 0x07070707;
shr.b32 s, m, 4;
or.b32 s, s, m;
prmt.b32 s, s, s, 0x0020;
prmt.b32 l, t0, t1, s;
prmt.b32 h, u0, u1, s;
shl.b32 g, c, 4;
and.b32 g, g, 0x80808080;
or.b32 h, h, g;
prmt.b32 $0, l, h, 0x5140;
prmt.b32 $1, l, h, 0x7362;
}}"""
    raise ValueError(f"no PTX decoder for {bits}-bit codes")

