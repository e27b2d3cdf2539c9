import pytest
import torch

from kernelplane_quant_turboquant.packing import pack, packed_bytes, unpack


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [8, 64, 96, 128])
def test_round_trip_and_exact_size(bits, dim):
    codes = torch.randint(0, 2 ** bits, (4, 3, dim), generator=torch.Generator().manual_seed(bits * dim))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 3, dim * bits // 8) == (4, 3, packed_bytes(dim, bits))
    assert torch.equal(unpack(packed, bits, dim), codes)


def test_layout_is_planar():
    # 2 bits, dim 16: code j in byte j % 4 at bit 2 * (j // 4).
    codes = torch.zeros(16, dtype=torch.int64)
    codes[9] = 3  # byte 1, bits 4-5
    assert pack(codes, 2).tolist() == [0, 0b110000, 0, 0]


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(12, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="1..4 bits"):
        pack(torch.zeros(16, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="expected 4 bytes"):
        unpack(torch.zeros(5, dtype=torch.uint8), 2, 16)
