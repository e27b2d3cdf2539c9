import pytest
import torch

from kernelplane_quant_turboquant.packing import pack, packed_bytes, unpack


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [32, 64, 96, 128, 256])
def test_round_trip_and_exact_size(bits, dim):
    codes = torch.randint(0, 2 ** bits, (4, 3, dim), generator=torch.Generator().manual_seed(bits * dim))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 3, dim * bits // 8) == (4, 3, packed_bytes(dim, bits))
    assert torch.equal(unpack(packed, bits, dim), codes)


def test_layout_puts_one_code_of_each_field_in_every_byte():
    # 2 bits, dim 32: 4 fields of 8 codes; code j = 8f + i in byte i at bit 2f.
    codes = torch.zeros(32, dtype=torch.int64)
    codes[8 * 2 + 1] = 3  # field 2, byte 1, bits 4-5
    assert pack(codes, 2).tolist() == [0, 0b110000, 0, 0, 0, 0, 0, 0]
    # 4 bits, dim 32: 2 fields of 16; code j = 16f + i in byte i at bit 4f.
    codes = torch.zeros(32, dtype=torch.int64)
    codes[16 + 3] = 9
    assert pack(codes, 4).tolist()[3] == 9 << 4
    # 3 bits, dim 64: low 2 bits as for 2 bits (16 bytes); the top bit of
    # j = 16f + i in extra byte i % 8 at bit 2f + i // 8.
    codes = torch.zeros(64, dtype=torch.int64)
    codes[16 * 2 + 9] = 4 | 1  # f=2, i=9
    packed = pack(codes, 3).tolist()
    assert packed[9] == 1 << 4 and packed[16:] == [0, 1 << 5, 0, 0, 0, 0, 0, 0]


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(torch.zeros(48, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="1..4 bits"):
        pack(torch.zeros(32, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="expected 8 bytes"):
        unpack(torch.zeros(5, dtype=torch.uint8), 2, 32)
