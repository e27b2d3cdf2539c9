"""Codebooks in shapes the Gluon decode kernel reads exactly.

A b-bit code (sign-magnitude) stands for one of ``2^(b-1)`` magnitudes or its
negative. The Gluon kernel (``gluon_decode``) turns codes into centroids by byte
permutes: int8 numbers for the keys' score product and float16 ones for the
values. At 2 and 3 bits the value decoder looks up the high byte of a float16
number whose low byte is zero (sign, exponent and two mantissa bits), so in some
unit of its own each magnitude must be a small integer and a float16 number with
two mantissa bits. At 4 bits (eight magnitudes) the decoders look up one byte per
magnitude and make the sign by complementing it, so the magnitudes must be odd
integers below 256 (``gluon_decode``). The codec stores the magnitudes in such a
shape, scaled to lie nearest Lloyd-Max's (``fit_shape``), and the kernels multiply
by the unit once, in the scales they already apply:

- 2 bits, ``3 : 10``: Lloyd-Max's pair for the normal distribution, (0.4528,
  1.5104), is almost exactly in that ratio (its expected squared error moves in
  the seventh decimal); the values decoder reads 1.5 and 5 (``cubic`` also
  evaluates it exactly as a float16 cubic);
- 3 bits, values ``1 : 3 : 5 : 8`` (float16 0.25, 0.75, 1.25, 2): Lloyd-Max's
  magnitudes (0.2451, 0.7560, 1.3440, 2.1520) are about 1 : 3.08 : 5.48 : 8.78;
  of the shapes float16 holds with two mantissa bits, this one adds least to the
  normal distribution's expected squared error: 1.1 % (Lloyd-Max's 0.03455).
  Keys need only int8 numbers: ``10 : 31 : 55 : 88`` is the normal distribution's
  Lloyd-Max magnitudes within 0.3 % each (the keys' error costs more than the values', so they keep
  it: through the engine's path the value shape on both cost 4 % more KL);
- 4 bits, ``11 : 33 : 55 : 79 : 105 : 135 : 173 : 229``: of the odd-integer
  shapes up to 255 the one nearest Lloyd-Max's magnitudes in expected squared
  error (0.05 % above Lloyd-Max's 0.009501; found by search).

A table off its shape would be decoded with an error that is the same for every
key with that code and does not average out over a long context, so the decoders
refuse it (``check_shape``).
"""
from __future__ import annotations

import functools
import math

import torch

_ODD_4 = (11, 33, 55, 79, 105, 135, 173, 229)
# Magnitudes, ascending, in units of their own, by the role of the vectors (keys, values) and bits.
SHAPES = {"value": {2: (3, 10), 3: (1, 3, 5, 8), 4: _ODD_4},
          "key": {2: (3, 10), 3: (10, 31, 55, 88), 4: _ODD_4}}


ROLES = tuple(SHAPES)


def shape_of(bits: int, role: str = "value") -> tuple[int, ...]:
    if role not in SHAPES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    try:
        return SHAPES[role][bits]
    except KeyError:
        raise ValueError(f"no decoder shape for {bits}-bit codes (shapes exist for {sorted(SHAPES[role])} bits)") from None


def _describe(shape: tuple[int, ...]) -> str:
    return " : ".join(str(s) for s in shape)


@functools.lru_cache(maxsize=None)
def fit_shape(bits: int, magnitudes: tuple[float, ...], role: str = "value") -> tuple[float, ...]:
    """The magnitudes ``shape * u`` nearest the Lloyd-Max ``magnitudes`` (ascending):
    least squares weighted by the probability of each magnitude's cell under the normal
    distribution (a close stand-in for the rotated coordinates' law at the head dims in
    use)."""
    shape = shape_of(bits, role)
    if len(magnitudes) != len(shape):
        raise ValueError(f"{bits}-bit codes have {len(shape)} magnitudes, got {len(magnitudes)}")
    edges = [0.0] + [(a + b) / 2 for a, b in zip(magnitudes, magnitudes[1:])] + [math.inf]
    cdf = [0.5 * math.erf(e / math.sqrt(2.0)) if math.isfinite(e) else 0.5 for e in edges]
    weights = [hi - lo for lo, hi in zip(cdf, cdf[1:])]
    u = sum(w * s * m for w, s, m in zip(weights, shape, magnitudes)) / sum(w * s * s for w, s in zip(weights, shape))
    return tuple(s * u for s in shape)


def check_shape(table: torch.Tensor, bits: int, role: str = "value") -> float:
    """The unit of a ``bits``-bit ``table`` (sign-magnitude order) in its decoders' shape for ``role``:
    ``table[code] = shape[code] * unit``, negated for the upper half; raises unless it has
    that shape."""
    shape = shape_of(bits, role)
    unit = float(table[0]) / shape[0]
    expected = [s * unit for s in shape] + [-s * unit for s in shape]
    if len(table) != len(expected) or unit <= 0 or \
            any(abs(float(t) - e) > 1e-6 * abs(e) for t, e in zip(table.tolist(), expected)):
        raise ValueError(f"{bits}-bit table {table.tolist()} is not in the shape {_describe(shape)} "
                         f"the GPU decoders read exactly for {role}s (see shapes)")
    return unit
