"""The 2-bit codebook's shape 3 : 10 as a float16 cubic, and where each GPU decoder reads it exactly.

A 2-bit code (sign-magnitude: ``x = 0, 1, 2, 3`` stand for ``a, b, -a, -b``)
has two magnitudes, stored in the ratio 3 : 10 (``shapes``). In that shape
each decoder works in units of its own where the four values are exact, and
the kernels multiply by the unit once, in the scales they already apply:

- the Triton kernel (``kernels._field``, ``LOOKUP == 3``) decodes without a
  table: with ``y = x - 2`` (read from the code's bits as the mantissa of a
  float16 of known exponent) the cubic ``((c3 y + c2) y + c1) y + c0``
  through ``(9, 30, -9, -30) / 16`` has coefficients and intermediates that
  are multiples of 1/16 below 32, so float16 evaluates it exactly on packed
  pairs (``decoder_cubic``);
- the Gluon kernel's int8 key table holds ``(36, 120, -36, -120)`` and its
  value decoder the float16 numbers ``1.5, 5, -1.5, -5``, whose low bytes are
  zero, so one byte lookup per value makes them (``gluon_decode``).

The decoders refuse a table off this shape (``shapes.check_shape``).
"""
from __future__ import annotations

import torch

from .shapes import check_shape

CUBIC_PAIR = (9 / 16, 30 / 16)  # the Triton decoder's units: the shape on a grid float16 holds exactly


def coefficients(a: float, b: float) -> tuple[float, float, float, float]:
    """``(c0, c1, c2, c3)`` of the cubic through ``(y, value) = (-2, a), (-1, b), (0, -a), (1, -b)``."""
    c3 = (a + b) / 3
    return -a, -b - c3, a, c3


def _round16(x: float) -> float:
    return torch.tensor(x, dtype=torch.float64).to(torch.float16).double().item()


def evaluate16(coeffs: tuple[float, float, float, float], y: float, fused: bool) -> float:
    """The kernel's Horner evaluation in float16 (each operation rounded; ``fused``:
    a multiply-add rounds once)."""
    c0, c1, c2, c3 = (_round16(c) for c in coeffs)
    acc = c3
    for c in (c2, c1, c0):
        acc = _round16(acc * y + c) if fused else _round16(_round16(acc * y) + c)
    return acc


def check_exact(table: torch.Tensor) -> tuple[float, float, float, float]:
    """Coefficients for a 2-bit ``table`` (sign-magnitude order, in the decoder's units),
    after checking that float16 Horner reproduces every entry exactly; raises otherwise."""
    a, b = float(table[0]), float(table[1])
    coeffs = coefficients(a, b)
    for x in range(4):
        for fused in (True, False):
            got = evaluate16(coeffs, x - 2.0, fused)
            if got != float(table[x]):
                raise ValueError(f"2-bit table {table.tolist()} is not exact as a float16 cubic: "
                                 f"code {x} gives {got}")
    return coeffs


def decoder_cubic(table: torch.Tensor) -> tuple[tuple[float, float, float, float], float]:
    """(the Triton decoder's cubic coefficients, the unit its values are in: multiply by it
    to get ``table``'s values) for a 2-bit ``table`` in the shape 3 : 10."""
    check_shape(table, 2)
    a, b = CUBIC_PAIR
    return check_exact(torch.tensor([a, b, -a, -b], dtype=torch.float64)), float(table[0]) / a
