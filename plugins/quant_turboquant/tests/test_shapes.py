"""Codebooks in the shapes the Gluon decoders read exactly (``shapes``): what they cost
against Lloyd-Max's, and that the codec's tables have them."""
import math

import pytest
import torch

from kernelplane_quant_turboquant import shapes
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
    a2, b2 = shapes.fit_shape(2, (a, b))
    assert a2 * 10 == pytest.approx(b2 * 3, rel=1e-12)
    # The rotated coordinates' squared error grows by at most 0.01 % (dim 32; 4e-6 at 128).
    lloyd, shaped = sphere_mse([-b, -a, a, b], dim), sphere_mse([-b2, -a2, a2, b2], dim)
    assert 0 <= shaped - lloyd < 1.1e-4 * lloyd
    table = TurboQuantCodec(2, dim, seed=1).table.double()
    assert table.tolist() == pytest.approx([a2, b2, -a2, -b2], rel=1e-7)  # float32
    shapes.check_shape(table, 2)


def test_the_shape_costs_nothing_measurable():
    a, b = gaussian_codebook(2).positive_centroids
    a2, b2 = shapes.fit_shape(2, (a, b))
    lloyd = gaussian_mse([-b, -a, a, b])
    shaped = gaussian_mse([-b2, -a2, a2, b2])
    assert lloyd == pytest.approx(0.1175, abs=2e-4)  # the published 2-bit Lloyd-Max MSE
    assert 0 <= shaped - lloyd < 1e-5 * lloyd  # below 0.001 %


def _symmetric(magnitudes):
    return [-m for m in reversed(magnitudes)] + list(magnitudes)


@pytest.mark.parametrize("dim", [64, 128])
def test_the_3_bit_table_has_its_shape_and_costs_about_one_percent(dim):
    lloyd = codebook_for(3, dim).positive_centroids
    shaped = shapes.fit_shape(3, lloyd, "value")
    unit = shaped[0]
    assert [s / unit for s in shaped] == pytest.approx([1, 3, 5, 8], rel=1e-12)
    # Each magnitude within 9 % of Lloyd-Max's (the outermost moves most).
    assert all(abs(s - m) < 0.09 * m for s, m in zip(shaped, lloyd))
    lloyd_mse, shaped_mse = sphere_mse(_symmetric(lloyd), dim), sphere_mse(_symmetric(shaped), dim)
    assert 0 <= shaped_mse - lloyd_mse < 0.015 * lloyd_mse
    table = TurboQuantCodec(3, dim, seed=1, role="value").table.double()
    assert table.tolist() == pytest.approx(list(shaped) + [-s for s in shaped], rel=1e-7)  # float32
    assert shapes.check_shape(table, 3, "value") == pytest.approx(unit, rel=1e-7)


@pytest.mark.parametrize("dim", [64, 128])
def test_the_3_bit_key_table_is_lloyd_max_on_an_int8_grid(dim):
    """Keys need only int8 steps: their shape moves each magnitude by about 1 % at most."""
    lloyd = codebook_for(3, dim).positive_centroids
    shaped = shapes.fit_shape(3, lloyd, "key")
    assert [s / shaped[0] * 10 for s in shaped] == pytest.approx([10, 31, 55, 88], rel=1e-12)
    assert all(abs(s - m) < 0.012 * m for s, m in zip(shaped, lloyd))
    lloyd_mse, shaped_mse = sphere_mse(_symmetric(lloyd), dim), sphere_mse(_symmetric(shaped), dim)
    assert 0 <= shaped_mse - lloyd_mse < 5e-4 * lloyd_mse  # 0.03 % at head dim 64
    table = TurboQuantCodec(3, dim, seed=1, role="key").table.double()
    assert shapes.check_shape(table, 3, "key") == pytest.approx(shaped[0] / 10, rel=1e-7)
    with pytest.raises(ValueError, match="shape 1 : 3 : 5 : 8 the GPU decoders read exactly for values"):
        shapes.check_shape(table, 3, "value")


@pytest.mark.parametrize("dim", [64, 128])
def test_the_4_bit_table_has_its_shape_and_costs_almost_nothing(dim):
    lloyd = codebook_for(4, dim).positive_centroids
    shaped = shapes.fit_shape(4, lloyd)
    unit = shaped[0] / 11
    assert [s / unit for s in shaped] == pytest.approx([11, 33, 55, 79, 105, 135, 173, 229], rel=1e-12)
    lloyd_mse, shaped_mse = sphere_mse(_symmetric(lloyd), dim), sphere_mse(_symmetric(shaped), dim)
    assert 0 <= shaped_mse - lloyd_mse < 0.005 * lloyd_mse  # 0.2 % at head dim 64, less at 128
    assert shapes.check_shape(TurboQuantCodec(4, dim, seed=1).table.double(), 4) == pytest.approx(unit, rel=1e-7)


def test_the_3_bit_shape_against_the_published_lloyd_max_error():
    lloyd = gaussian_codebook(3).positive_centroids
    lloyd_mse = gaussian_mse(_symmetric(lloyd))
    assert lloyd_mse == pytest.approx(0.03455, abs=1e-4)  # the published 3-bit Lloyd-Max MSE
    shaped_mse = gaussian_mse(_symmetric(shapes.fit_shape(3, lloyd, "value")))
    assert 1.005 * lloyd_mse < shaped_mse < 1.015 * lloyd_mse


def test_the_2_bit_fit_is_the_weighted_least_squares_pair():
    a, b = gaussian_codebook(2).positive_centroids
    a2, b2 = shapes.fit_shape(2, (a, b))
    assert 10 * a2 == pytest.approx(3 * b2, rel=1e-12)
    assert (a2, b2) == pytest.approx((a, b), rel=0.01)


def test_tables_off_their_shape_and_widths_without_one_are_refused():
    lloyd = codebook_for(3, 64).positive_centroids
    with pytest.raises(ValueError, match="shape 1 : 3 : 5 : 8"):
        shapes.check_shape(torch.tensor(list(lloyd) + [-m for m in lloyd], dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="role must be one of value, key"):
        shapes.shape_of(3, "query")
    with pytest.raises(ValueError, match="no decoder shape for 1-bit codes"):
        shapes.fit_shape(1, tuple(codebook_for(1, 64).positive_centroids))
    with pytest.raises(ValueError, match="3-bit codes have 4 magnitudes"):
        shapes.fit_shape(3, (0.5, 1.5))
