"""The 2-bit codebook's shape 3 : 10, and the table-free cubic decoder exact in float16."""
import math

import pytest
import torch

from kernelplane_quant_turboquant import cubic
from kernelplane_quant_turboquant.codebook import codebook_for, gaussian_codebook
from kernelplane_quant_turboquant.codec import TurboQuantCodec


def gaussian_mse(centroids: list[float]) -> float:
    """Expected squared error of nearest-centroid quantization of N(0, 1) (fine grid)."""
    x = torch.linspace(-10, 10, 400_001, dtype=torch.float64)
    density = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    return _mse(x, density * (x[1] - x[0]), centroids)


def sphere_mse(centroids: list[float], dim: int) -> float:
    """The same for sqrt(dim) times a coordinate of a uniform unit vector (``codebook``)."""
    x = torch.linspace(-math.sqrt(dim), math.sqrt(dim), 400_001, dtype=torch.float64)
    density = torch.exp(0.5 * (dim - 3) * torch.log1p(-(x * x / dim).clamp(max=1.0)))
    return _mse(x, density / density.sum(), centroids)


def _mse(x: torch.Tensor, weight: torch.Tensor, centroids: list[float]) -> float:
    c = torch.tensor(centroids, dtype=torch.float64)
    return float(((x[:, None] - c[None, :]).abs().min(dim=1).values ** 2 * weight).sum())


@pytest.mark.parametrize("dim", [32, 64, 96, 128, 256, 512])
def test_the_codec_table_has_the_shape_and_moves_little(dim):
    a, b = codebook_for(2, dim).positive_centroids
    a2, b2 = cubic.fit_pair(a, b)
    assert a2 * 10 == pytest.approx(b2 * 3, rel=1e-12)
    # The rotated coordinates' squared error grows by at most 0.01 % (dim 32; 4e-6 at 128).
    lloyd, shaped = sphere_mse([-b, -a, a, b], dim), sphere_mse([-b2, -a2, a2, b2], dim)
    assert 0 <= shaped - lloyd < 1.1e-4 * lloyd
    table = TurboQuantCodec(2, dim, seed=1).table.double()
    assert table.tolist() == pytest.approx([a2, b2, -a2, -b2], rel=1e-7)  # float32
    cubic.check_shape(table)


def test_the_cubic_decodes_exactly_in_its_units():
    table = TurboQuantCodec(2, 128, seed=1).table.double()
    coeffs, unit = cubic.decoder_cubic(table)
    a, b = cubic.CUBIC_PAIR
    for code, want in enumerate([a, b, -a, -b]):
        for fused in (True, False):
            got = cubic.evaluate16(coeffs, code - 2.0, fused)
            assert got == want
            assert got * unit == pytest.approx(table[code].item(), rel=1e-6)


def test_the_shape_costs_nothing_measurable():
    a, b = gaussian_codebook(2).positive_centroids
    a2, b2 = cubic.fit_pair(a, b)
    lloyd = gaussian_mse([-b, -a, a, b])
    shaped = gaussian_mse([-b2, -a2, a2, b2])
    assert lloyd == pytest.approx(0.1175, abs=2e-4)  # the published 2-bit Lloyd-Max MSE
    assert 0 <= shaped - lloyd < 1e-5 * lloyd  # below 0.001 %


def test_a_table_off_the_shape_is_refused():
    a, b = gaussian_codebook(2).positive_centroids  # Lloyd-Max values as they are
    with pytest.raises(ValueError, match="shape 3 : 10"):
        cubic.decoder_cubic(torch.tensor([a, b, -a, -b], dtype=torch.float64))
    with pytest.raises(ValueError, match="not exact as a float16 cubic"):
        cubic.check_exact(torch.tensor([a, b, -a, -b], dtype=torch.float64))
