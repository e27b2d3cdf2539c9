"""Scalar Lloyd-Max codebooks for the coordinates of a randomly rotated unit vector.

After a random rotation every coordinate of a unit vector in R^d has the same
distribution: the marginal of the uniform distribution on the sphere, with
density proportional to (1 - x^2)^((d-3)/2) on [-1, 1]. Times sqrt(d) it
tends to the standard normal. One scalar quantizer per (bits, d), fitted to
that marginal, is therefore near-optimal for every vector: no calibration.

Codebooks here are in units of the standard normal (multiply by 1/sqrt(d) to
get unit-vector coordinates). They are computed on first use by Lloyd's
iteration (thresholds at midpoints, centroids at conditional means), in plain
Python for the Gaussian and in float64 torch on a fine grid for the exact
sphere marginal.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

MAX_BITS = 4
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Codebook:
    """``centroids`` ascending (2**bits of them, symmetric about 0) and the
    ``thresholds`` between neighbours, both in standard-normal units;
    ``mse`` is the expected squared error per coordinate in the same units
    (the error per unit vector equals it when coordinates are scaled by
    1/sqrt(d))."""

    bits: int
    centroids: tuple[float, ...]
    thresholds: tuple[float, ...]
    mse: float
    distribution: str  # "gaussian" or "sphere(d)"

    @property
    def positive_centroids(self) -> tuple[float, ...]:
        return self.centroids[len(self.centroids) // 2:]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"codebook bits must be an integer in 1..{MAX_BITS}, got {bits!r}")


def _uniform_start(levels: int) -> list[float]:
    # Evenly spaced over about +-2.5 sigma: close enough for Lloyd to converge fast.
    return [-2.5 + 5.0 * (i + 0.5) / levels for i in range(levels)]


@functools.lru_cache(maxsize=None)
def gaussian_codebook(bits: int) -> Codebook:
    """Lloyd-Max quantizer of N(0, 1) with 2**bits levels."""
    _check_bits(bits)

    def pdf(x: float) -> float:
        return _INV_SQRT_2PI * math.exp(-0.5 * x * x) if math.isfinite(x) else 0.0

    def cdf(x: float) -> float:
        return 0.5 * (1.0 + math.erf(x / _SQRT2))

    centroids = _uniform_start(2 ** bits)
    for _ in range(100_000):
        edges = [-math.inf] + [(a + b) / 2 for a, b in zip(centroids, centroids[1:])] + [math.inf]
        # E[X | a < X < b] = (pdf(a) - pdf(b)) / (cdf(b) - cdf(a)) for the standard normal.
        new = [(pdf(a) - pdf(b)) / (cdf(b) - cdf(a)) for a, b in zip(edges, edges[1:])]
        shift = max(abs(x - y) for x, y in zip(new, centroids))
        centroids = new
        if shift < 1e-13:
            break
    thresholds = [(a + b) / 2 for a, b in zip(centroids, centroids[1:])]
    edges = [-math.inf] + thresholds + [math.inf]
    # E[(X - c)^2] over a cell = E[X^2 1_cell] - 2c E[X 1_cell] + c^2 P(cell), with
    # E[X^2 1_(a,b)] = P(a,b) + a pdf(a) - b pdf(b).
    mse = 0.0
    for c, a, b in zip(centroids, edges, edges[1:]):
        p = cdf(b) - cdf(a)
        first = pdf(a) - pdf(b)
        second = p + (a * pdf(a) if math.isfinite(a) else 0.0) - (b * pdf(b) if math.isfinite(b) else 0.0)
        mse += second - 2 * c * first + c * c * p
    return Codebook(bits, tuple(centroids), tuple(thresholds), mse, "gaussian")


@functools.lru_cache(maxsize=None)
def sphere_codebook(bits: int, dim: int, grid_points: int = 100_001) -> Codebook:
    """Lloyd-Max quantizer of sqrt(dim) * x, x one coordinate of a uniform unit vector in R^dim."""
    _check_bits(bits)
    if not isinstance(dim, int) or dim < 3:
        raise ValueError(f"sphere codebook needs an integer dimension >= 3, got {dim!r}")
    # Grid over y = sqrt(dim) * x, cut where the density is below e^-70.
    half_width = min(math.sqrt(dim), 12.0)
    y = torch.linspace(-half_width, half_width, grid_points, dtype=torch.float64)
    log_density = 0.5 * (dim - 3) * torch.log1p(-(y * y / dim).clamp(max=1.0))
    density = torch.exp(log_density - log_density.max())
    # Cumulative integrals of density, y*density and y^2*density (trapezoid),
    # read anywhere by linear interpolation: each Lloyd step is then O(levels).
    cumulative = [_cumulative_trapezoid(y, density * y ** k) for k in range(3)]
    total = cumulative[0][-1].item()
    tables = [(c / total).tolist() for c in cumulative]
    step = (2 * half_width) / (grid_points - 1)

    def integral(k: int, a: float, b: float) -> float:
        return _interp(tables[k], (b + half_width) / step) - _interp(tables[k], (a + half_width) / step)

    def cells(centroids: list[float]) -> list[tuple[float, float]]:
        edges = [-half_width] + [(p + q) / 2 for p, q in zip(centroids, centroids[1:])] + [half_width]
        return list(zip(edges, edges[1:]))

    # Start from the Gaussian solution: the marginal is close to it, so few iterations remain.
    centroids = [max(-half_width, min(half_width, c)) for c in gaussian_codebook(bits).centroids]
    for _ in range(100_000):
        new = [integral(1, a, b) / integral(0, a, b) for a, b in cells(centroids)]
        shift = max(abs(p - q) for p, q in zip(new, centroids))
        centroids = new
        if shift < 1e-13:
            break
    centroids = [(c - m) / 2 for c, m in zip(centroids, reversed(centroids))]  # exact symmetry
    mse = sum(integral(2, a, b) - 2 * c * integral(1, a, b) + c * c * integral(0, a, b)
              for c, (a, b) in zip(centroids, cells(centroids)))
    thresholds = [(p + q) / 2 for p, q in zip(centroids, centroids[1:])]
    return Codebook(bits, tuple(centroids), tuple(thresholds), mse, f"sphere({dim})")


def codebook_for(bits: int, dim: int) -> Codebook:
    """The codebook the quantizer uses: the exact sphere marginal for ``dim``."""
    return sphere_codebook(bits, dim)


def _cumulative_trapezoid(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    steps = (f[1:] + f[:-1]) * (x[1:] - x[:-1]) / 2
    return torch.cat([torch.zeros(1, dtype=f.dtype), steps.cumsum(0)])


def _interp(table: list[float], pos: float) -> float:
    """Linear interpolation in an evenly spaced table at fractional index ``pos``."""
    pos = min(max(pos, 0.0), len(table) - 1.0)
    left = min(int(pos), len(table) - 2)
    frac = pos - left
    return table[left] * (1.0 - frac) + table[left + 1] * frac
