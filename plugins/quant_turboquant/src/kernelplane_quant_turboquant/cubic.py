"""The 2-bit codebook as a cubic that float16 arithmetic evaluates exactly.

A 2-bit code (sign-magnitude: ``x = 0, 1, 2, 3`` stand for ``a, b, -a, -b``)
can be decoded without a table: with ``y = x - 2`` (in ``-2 .. 1``) one cubic
``((c3 y + c2) y + c1) y + c0`` passes through all four centroids. The kernel
(``kernels._field``, ``LOOKUP == 3``) gets ``y`` from the code's bits with
one OR and one subtraction (the bits are read as the mantissa of a float16 of
known exponent) and evaluates the cubic on packed float16 pairs: about half
the instructions of the other decoders, and no shared-memory layout change.

Solving for the cubic gives ``c0 = -a, c2 = a, c3 = (a + b) / 3,
c1 = -b - c3``. Rounded to float16 these coefficients would miss the
centroids by up to 1e-3, and such an error is the same for every key and
value with that code, so it does not average out over a long context. So the
centroids themselves are moved to multiples of 2**-10 with ``a + b``
divisible by 3 units: every coefficient, intermediate and result is then a
float16 number and the cubic is exact (checked below on every code, with and
without fused multiply-adds). The move is below 1.5e-3 standard-normal
units, a change of the quantizer's error in the seventh decimal.
"""
from __future__ import annotations

import functools

import torch

UNIT = 2.0 ** -10


@functools.lru_cache(maxsize=None)
def exact_pair(a: float, b: float) -> tuple[float, float]:
    """The pair ``(a', b')`` nearest ``(a, b)`` (multiples of 2**-10) whose cubic is exact in float16."""
    ua, ub = round(a / UNIT), round(b / UNIT)
    candidates = sorted(((i * UNIT - a) ** 2 + (j * UNIT - b) ** 2, i, j)
                        for i in range(ua - 8, ua + 9) for j in range(ub - 8, ub + 9) if (i + j) % 3 == 0 and 0 < i < j)
    for _, i, j in candidates:
        table = torch.tensor([i, j, -i, -j], dtype=torch.float64) * UNIT
        try:
            check_exact(table)
        except ValueError:
            continue
        return i * UNIT, j * UNIT
    raise ValueError(f"no float16-exact cubic near the 2-bit centroids {a}, {b}")


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
    """Coefficients for a 2-bit ``table`` (sign-magnitude order), after checking
    that float16 Horner reproduces every entry exactly; raises otherwise."""
    a, b = float(table[0]), float(table[1])
    coeffs = coefficients(a, b)
    for x in range(4):
        for fused in (True, False):
            got = evaluate16(coeffs, x - 2.0, fused)
            if got != float(table[x]):
                raise ValueError(f"2-bit table {table.tolist()} is not exact as a float16 cubic: "
                                 f"code {x} gives {got}")
    return coeffs
