"""Random rotations that make every coordinate of a unit vector look Gaussian.

``RandomizedHadamard`` (power-of-two dims) applies, per round, fixed random
signs and then the normalized Walsh-Hadamard transform: O(d log d), no
stored matrix. One round spreads any vector evenly in magnitude (a one-hot
becomes +-1/sqrt(d) everywhere) but leaves such inputs two-valued, which a
Gaussian codebook quantizes badly (2-bit error 0.255 per unit vector on
one-hots at d=128, against 0.116 for random inputs). Two rounds map all
one-hots to permutations of one vector (H D H e_i is a dyadic shift of
H D 1), so their error is one draw. Three rounds behave like a dense random
rotation on every input we tried; see tests/test_rotation.py.

``DenseRotation`` (any dim) is a Haar-random orthogonal matrix from the QR
decomposition of a Gaussian one, the construction in the paper.

Both are seeded deterministically (seed from layer/format/head dim), act on
the last dim of any tensor, and can hand out their matrix for kernels.
Rotated x is ``x @ matrix().T``; the inverse is ``y @ matrix()``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform over the last dim (a power of two)."""
    d = x.shape[-1]
    if not is_power_of_two(d):
        raise ValueError(f"Walsh-Hadamard transform needs a power-of-two size, got {d}")
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        pairs = y.view(-1, d // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(-1, d)
        h *= 2
    return y.view(*lead, d)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


class RandomizedHadamard:
    """``rounds`` x (random signs, then Walsh-Hadamard / sqrt(d))."""

    kind = "hadamard"

    def __init__(self, dim: int, seed: int, rounds: int = 3):
        if not is_power_of_two(dim):
            raise ValueError(f"randomized Hadamard needs a power-of-two dim, got {dim} (use DenseRotation)")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.dim, self.seed, self.rounds = dim, seed, rounds
        gen = _generator(seed)
        self.signs = [(torch.randint(0, 2, (dim,), generator=gen) * 2 - 1).float() for _ in range(rounds)]
        self._cache: dict = {}

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        y = _as_float(x)
        norm = 1.0 / math.sqrt(self.dim)
        for signs in self.signs:
            y = walsh_hadamard(y * signs.to(y.device, y.dtype)) * norm
        return y

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        x = _as_float(y)
        norm = 1.0 / math.sqrt(self.dim)
        for signs in reversed(self.signs):
            x = walsh_hadamard(x) * norm * signs.to(x.device, x.dtype)
        return x

    def matrix(self, device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._cache:
            m = self.rotate(torch.eye(self.dim, dtype=torch.float64)).T
            self._cache[key] = m.to(device=device, dtype=dtype)
        return self._cache[key]


class DenseRotation:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""

    kind = "dense"

    def __init__(self, dim: int, seed: int):
        if dim < 1:
            raise ValueError(f"rotation dim must be positive, got {dim}")
        self.dim, self.seed = dim, seed
        g = torch.randn(dim, dim, generator=_generator(seed), dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        self._matrix = q * torch.sign(torch.diagonal(r))[None, :]  # makes the distribution Haar
        self._cache: dict = {}

    def matrix(self, device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self._matrix.to(device=device, dtype=dtype)
        return self._cache[key]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_float(x)
        return x @ self.matrix(x.device, x.dtype).T

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        y = _as_float(y)
        return y @ self.matrix(y.device, y.dtype)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def make_rotation(dim: int, seed: int, hadamard_rounds: int = 3):
    """Randomized Hadamard for power-of-two dims, a dense random rotation otherwise."""
    if is_power_of_two(dim):
        return RandomizedHadamard(dim, seed, rounds=hadamard_rounds)
    return DenseRotation(dim, seed)
