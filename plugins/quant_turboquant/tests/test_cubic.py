"""The table-free 2-bit cubic decoder, exact in float16 on the shape 3 : 10."""
import pytest
import torch

from kernelplane_quant_turboquant import cubic
from kernelplane_quant_turboquant.codebook import gaussian_codebook
from kernelplane_quant_turboquant.codec import TurboQuantCodec


def test_the_cubic_decodes_exactly_in_its_units():
    table = TurboQuantCodec(2, 128, seed=1).table.double()
    coeffs, unit = cubic.decoder_cubic(table)
    a, b = cubic.CUBIC_PAIR
    for code, want in enumerate([a, b, -a, -b]):
        for fused in (True, False):
            got = cubic.evaluate16(coeffs, code - 2.0, fused)
            assert got == want
            assert got * unit == pytest.approx(table[code].item(), rel=1e-6)


def test_a_table_off_the_shape_is_refused():
    a, b = gaussian_codebook(2).positive_centroids  # Lloyd-Max values as they are
    with pytest.raises(ValueError, match="shape 3 : 10"):
        cubic.decoder_cubic(torch.tensor([a, b, -a, -b], dtype=torch.float64))
    with pytest.raises(ValueError, match="not exact as a float16 cubic"):
        cubic.check_exact(torch.tensor([a, b, -a, -b], dtype=torch.float64))
