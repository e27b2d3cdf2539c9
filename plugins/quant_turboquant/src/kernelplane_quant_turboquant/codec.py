"""TurboQuant for single vectors: norm + b-bit codes of the rotated direction.

``encode``: ``x -> (codes, norm)`` with ``norm = |x|``; the unit vector
``x / |x|`` is rotated (every coordinate then ~ N(0, 1/d)), scaled by
sqrt(d), and each coordinate replaced by the index of its Lloyd-Max cell.
``decode``: look the indices up, scale by 1/sqrt(d), rotate back, times norm.
Inner products can skip the rotation back: ``<q, x_hat> = <R q, R x_hat>``,
which is what the attention kernel does.

Codes are sign-magnitude: bit ``b-1`` set means negative, the low bits index
the centroid magnitudes in ascending order. ``table[code]`` is the centroid
in standard-normal units.
"""
from __future__ import annotations

import math

import torch

from .codebook import codebook_for
from .packing import check_dim, pack, packed_bytes, unpack
from .rotation import make_rotation
from .shapes import ROLES, fit_shape

NORM_DTYPE = torch.float16
_NORM_MAX = torch.finfo(NORM_DTYPE).max


NORM_MODES = ("mse", "length", "unbiased")

# The encoder's scale search tries scales ``exp(SEARCH_STEP * k)`` around 1 (1 included, so
# it never does worse than none). 16 of them span 0.76-1.38, where the best scale lies for
# nearly all Gaussian directions at d = 64-128 and 2-4 bits (5th-95th percentile: 0.76-1.32).
SEARCH_STEP = 0.04
SEARCH_CHUNK_ELEMENTS = 1 << 21  # scaled copies the PyTorch encoder holds at once


class TurboQuantCodec:
    """Quantizes vectors of one dimension to ``bits`` bits per coordinate.

    ``norm_mode`` says which scale is stored with the codes (same bytes, free
    at decode). With ``c`` the decoded unit direction and ``u = x / |x|``:
    ``"mse"`` stores ``|x|`` (the paper's MSE quantizer; decoded vectors, and
    every inner product with them, shrink by about 1 - MSE); ``"length"``
    stores ``|x| / |c|`` (decoded vectors keep their length; inner products
    shrink by about sqrt(1 - MSE)); ``"unbiased"`` stores ``|x| / <u, c>``
    (the decoded vector's component along x is x itself, so inner products
    with any direction are unbiased over random directions; error per unit
    vector about MSE / (1 - MSE)).
    """

    def __init__(self, bits: int, dim: int, seed: int, norm_mode: str = "mse", scale_search: int = 1,
                 role: str = "key"):
        """``scale_search``: how many input scales ``encode`` tries per vector (1: none; see
        ``search_scales``). ``role``: ``key`` or ``value``, which decoder shape the table takes
        (``shapes``; they differ at 3 bits)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        check_dim(dim)
        if scale_search < 1:
            raise ValueError(f"scale_search must be at least 1, got {scale_search}")
        if scale_search > 1 and norm_mode == "mse":
            raise ValueError("the mse norm's nearest cells already give each vector its least error: "
                             "scale_search must be 1 with norm_mode='mse'")
        if norm_mode not in NORM_MODES:
            raise ValueError(f"norm_mode must be one of {', '.join(NORM_MODES)}, got {norm_mode!r}")
        self.bits, self.dim, self.seed, self.norm_mode, self.role = bits, dim, seed, norm_mode, role
        self.scale_search = scale_search
        self.codebook = codebook_for(bits, dim)
        self.rotation = make_rotation(dim, seed)
        self.packed_bytes = packed_bytes(dim, bits)
        half = 2 ** (bits - 1)
        positive = self.codebook.positive_centroids
        if bits >= 2:
            # The shape nearest Lloyd-Max's that the GPU decoders read exactly (see shapes).
            positive = fit_shape(bits, tuple(positive), role)
        mags = torch.tensor(positive, dtype=torch.float64)
        # table[code], sign-magnitude codes (see module doc).
        self.table = torch.cat([mags, -mags]).float()
        centroids = torch.cat([-mags.flip(0), mags])  # ascending: cell order
        self.centroids = centroids.float()
        self.thresholds = ((centroids[1:] + centroids[:-1]) / 2).float()
        ascending = torch.arange(2 ** bits)
        # code of the k-th centroid in ascending order
        self.code_of_cell = torch.where(ascending >= half, ascending - half, half + (half - 1 - ascending))
        self._device_cache: dict = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = (self.table.to(device), self.thresholds.to(device),
                                       self.code_of_cell.to(device), self.rotation.matrix(device))
        return self._device_cache[key]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., dim]`` -> (uint8 codes ``[..., packed_bytes]``, float16 norms ``[...]``)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of dim {self.dim}, got shape {tuple(x.shape)}")
        table, _, _, rot = self._on(x.device)
        x = x.float()
        norm = x.norm(dim=-1)
        # One GEMM with the rotation matrix: at d <= 256 cheaper than log2(d) butterfly passes.
        y = (x @ rot.T) * (math.sqrt(self.dim) / norm.clamp_min(1e-30))[..., None]
        codes = self.codes_of(y)
        if self.norm_mode != "mse":
            c = table[codes] * (1.0 / math.sqrt(self.dim))
            if self.norm_mode == "length":
                norm = norm / c.norm(dim=-1).clamp_min(1e-30)
            else:
                along = (c * y).sum(dim=-1) * (1.0 / math.sqrt(self.dim))  # <u, c>: cosine, > 0
                norm = norm / along.clamp_min(1e-6)
        return pack(codes, self.bits), norm.clamp(max=_NORM_MAX).to(NORM_DTYPE)

    def codes_of(self, y: torch.Tensor) -> torch.Tensor:
        """The codes (one per coordinate, not packed) of rotated unit vectors scaled by
        ``sqrt(dim)``: each coordinate's nearest cell, or with ``scale_search`` the cells of
        the best scaled copy."""
        if self.scale_search > 1:
            return self._search(y)
        _, thresholds, code_of_cell, _ = self._on(y.device)
        return code_of_cell[torch.bucketize(y, thresholds)]

    def search_scales(self) -> list[float]:
        """The input scales tried per vector: ``exp(SEARCH_STEP * k)`` for ``scale_search``
        consecutive ``k`` from ``-(scale_search - 1) // 2``.

        Nearest-cell codes of ``y`` are not the code vector closest to ``y`` in direction:
        for each vector, some other scale ``a`` puts ``cells(a y)`` closer. With the norm
        stored beside the codes, direction is what matters: the ``unbiased`` and
        ``length`` norms make the error grow with the angle between ``y`` and its
        decoded code vector ``c`` alone, and the code vector of least angle is
        ``cells(a y)`` for some ``a`` (it maximizes ``<y, c> - |c|^2 / (2 a)`` too). (The
        ``mse`` norm decodes ``c`` at ``y``'s length: nearest cells already minimize
        ``|y - c|^2``, so it takes no search.)"""
        first = -((self.scale_search - 1) // 2)
        return [math.exp(SEARCH_STEP * (first + i)) for i in range(self.scale_search)]

    def search_scales_on(self, device: torch.device) -> torch.Tensor:
        """``search_scales`` as a float32 tensor on ``device`` (kernels read it)."""
        return self._cached("scales", device, lambda: torch.tensor(self.search_scales(), dtype=torch.float32))

    def _cached(self, name: str, device: torch.device, make) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = make().to(device)
        return self._device_cache[key]

    def _search(self, y: torch.Tensor) -> torch.Tensor:
        """Codes of ``y`` (scaled unit vectors) at the input scale whose code vector is closest
        to ``y`` in direction (the first such scale). All scales at once, over chunks of rows:
        a few tensor operations in all instead of a few per scale (a decode step's few rows
        cost calls, not arithmetic)."""
        _, thresholds, code_of_cell, _ = self._on(y.device)
        scales = self.search_scales_on(y.device)
        centroids = self._cached("centroids", y.device, lambda: self.centroids)
        rows = y.reshape(-1, self.dim)
        chunk = max(1, SEARCH_CHUNK_ELEMENTS // (len(scales) * self.dim))
        cells = torch.cat([self._best_cells(part, scales, centroids, thresholds) for part in rows.split(chunk)])
        return code_of_cell[cells].view(y.shape)

    @staticmethod
    def _best_cells(y: torch.Tensor, scales: torch.Tensor, centroids: torch.Tensor,
                    thresholds: torch.Tensor) -> torch.Tensor:
        """The cells of the best scaled copy of each row of ``y`` (``[n, d]``)."""
        cells = torch.bucketize(y * scales[:, None, None], thresholds)  # [scales, n, d]
        decoded = centroids[cells]
        along = (decoded * y).sum(dim=-1).clamp_min(0)
        best = (along * along / (decoded * decoded).sum(dim=-1).clamp_min(1e-30)).argmax(dim=0)  # d cos^2
        return cells.gather(0, best[None, :, None].expand(1, *cells.shape[1:]))[0]

    def decode_rotated(self, packed: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """Decoded vectors in the rotated basis (float32), i.e. ``R x_hat``."""
        table = self._on(packed.device)[0]
        unit = table[unpack(packed, self.bits, self.dim)] * (1.0 / math.sqrt(self.dim))
        return unit * norm.float()[..., None]

    def decode(self, packed: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """``(codes, norms)`` -> float32 vectors ``[..., dim]``."""
        rot = self._on(packed.device)[3]
        return self.decode_rotated(packed, norm) @ rot
