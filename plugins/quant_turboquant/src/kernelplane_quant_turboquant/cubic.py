"""The 2-bit codebook in the shape 3 : 10, which every GPU decoder reads exactly.

A 2-bit code (sign-magnitude: ``x = 0, 1, 2, 3`` stand for ``a, b, -a, -b``)
has two magnitudes. Lloyd-Max's pair for the normal distribution, (0.4528,
1.5104), is almost exactly in the ratio 3 : 10, so the codec stores the pair
``(3u, 10u)`` nearest it (``fit_pair``; the expected squared error of the
Gaussian moves in the seventh decimal). In that shape each decoder works in
units of its own where the four values are exact, and the kernels multiply
by the unit once, in the scales they already apply:

- the Triton kernel (``kernels._field``, ``LOOKUP == 3``) decodes without a
  table: with ``y = x - 2`` (read from the code's bits as the mantissa of a
  float16 of known exponent) the cubic ``((c3 y + c2) y + c1) y + c0``
  through ``(9, 30, -9, -30) / 16`` has coefficients and intermediates that
  are multiples of 1/16 below 32, so float16 evaluates it exactly on packed
  pairs (``decoder_cubic``);
- the Gluon kernel's int8 key table holds ``(36, 120, -36, -120)`` and its
  value decoder the float16 numbers ``1.5, 5, -1.5, -5``, whose low bytes are
  zero, so one byte lookup per value makes them (``gluon_decode``).

A table off this shape would be decoded with an error that is the same for
every key with that code and does not average out over a long context, so
the decoders refuse it (``check_shape``).
"""
from __future__ import annotations

import functools
import math

import torch

SHAPE = (3, 10)  # inner : outer magnitude
CUBIC_PAIR = (9 / 16, 30 / 16)  # the Triton decoder's units: the shape on a grid float16 holds exactly


@functools.lru_cache(maxsize=None)
def fit_pair(a: float, b: float) -> tuple[float, float]:
    """``(3u, 10u)`` nearest the Lloyd-Max pair ``(a, b)``: least squares weighted by the
    probability of each magnitude's cell under the normal distribution (a close
    stand-in for the rotated coordinates' law at the head dims in use)."""
    edge = (a + b) / 2
    inner = 0.5 * math.erf(edge / math.sqrt(2.0))  # P(0 < x < edge)
    outer = 0.5 - inner
    i, o = SHAPE
    u = (inner * i * a + outer * o * b) / (inner * i * i + outer * o * o)
    return i * u, o * u


def check_shape(table: torch.Tensor) -> None:
    """Raise unless the 2-bit ``table`` (sign-magnitude order) is ``(3u, 10u, -3u, -10u)``."""
    a, b = float(table[0]), float(table[1])
    i, o = SHAPE
    expected = [a, a * o / i, -a, -a * o / i]
    if a <= 0 or any(abs(float(t) - e) > 1e-6 * abs(e) for t, e in zip(table.tolist(), expected)):
        raise ValueError(f"2-bit table {table.tolist()} is not in the shape {i} : {o} the GPU decoders read "
                         f"exactly (see cubic)")


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
    check_shape(table)
    a, b = CUBIC_PAIR
    return check_exact(torch.tensor([a, b, -a, -b], dtype=torch.float64)), float(table[0]) / a
