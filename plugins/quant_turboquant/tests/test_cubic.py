"""The 2-bit codebook's table-free decoder: a cubic exact in float16."""
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
    c = torch.tensor(centroids, dtype=torch.float64)
    err = (x[:, None] - c[None, :]).abs().min(dim=1).values ** 2
    return float((err * density).sum() * (x[1] - x[0]))


@pytest.mark.parametrize("dim", [32, 64, 96, 128, 256, 512])
def test_centroids_move_little_and_decode_exactly(dim):
    a, b = codebook_for(2, dim).positive_centroids
    a2, b2 = cubic.exact_pair(a, b)
    assert abs(a2 - a) < 1.5e-3 and abs(b2 - b) < 1.5e-3
    table = TurboQuantCodec(2, dim, seed=1).table.double()
    assert table.tolist() == [a2, b2, -a2, -b2]
    coeffs = cubic.check_exact(table)
    for code in range(4):
        for fused in (True, False):
            assert cubic.evaluate16(coeffs, code - 2.0, fused) == table[code].item()


def test_the_move_costs_nothing_measurable():
    a, b = gaussian_codebook(2).positive_centroids
    a2, b2 = cubic.exact_pair(a, b)
    lloyd = gaussian_mse([-b, -a, a, b])
    moved = gaussian_mse([-b2, -a2, a2, b2])
    assert lloyd == pytest.approx(0.1175, abs=2e-4)  # the published 2-bit Lloyd-Max MSE
    assert 0 <= moved - lloyd < 1e-5 * lloyd * 100  # below 0.1 %


def test_a_table_off_the_grid_is_refused():
    a, b = gaussian_codebook(2).positive_centroids  # Lloyd-Max values as they are
    with pytest.raises(ValueError, match="not exact as a float16 cubic"):
        cubic.check_exact(torch.tensor([a, b, -a, -b], dtype=torch.float64))
