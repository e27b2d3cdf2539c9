"""The PTX decoders (kernel ``LOOKUP == 2``) run through a small simulator of
the instructions they use, against the table lookup they stand for. (The
CPU interpreter cannot run PTX; the GPU benchmark checks the kernel itself.)"""
import random
import re
import struct

import pytest
import torch

from kernelplane_quant_turboquant.codec import TurboQuantCodec
from kernelplane_quant_turboquant.decode_asm import decode_asm

MASK = 0xFFFFFFFF


def _prmt(a, b, selector):
    source = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = source[nibble & 7]
        if nibble & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def run_ptx(asm: str, operands: dict) -> dict:
    regs = dict(operands)

    def value(token):
        token = token.strip()
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", token):
            return int(token, 0)
        return regs[token]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        v = [value(s) for s in src]
        if op == "mov.b32":
            r = v[0]
        elif op == "shr.b32":
            r = v[0] >> v[1]
        elif op == "shl.b32":
            r = v[0] << v[1]
        elif op == "and.b32":
            r = v[0] & v[1]
        elif op == "or.b32":
            r = v[0] | v[1]
        elif op == "mad.lo.u32":
            r = v[0] * v[1] + v[2]
        elif op == "prmt.b32":
            r = _prmt(v[0], v[1], v[2])
        else:
            raise AssertionError(f"simulator lacks {op}")
        regs[dst] = r & MASK
    return regs


def _half(bits16):
    return struct.unpack("<e", struct.pack("<H", bits16))[0]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ptx_decodes_four_codes_per_word(bits):
    table = TurboQuantCodec(bits, 128, seed=1).table
    asm = decode_asm(bits, table)
    rng = random.Random(bits)
    fields = 2 if bits == 4 else 4
    for _ in range(200):
        word, extra = rng.getrandbits(32), rng.getrandbits(32)
        field = rng.randrange(fields)
        shift = (4 if bits == 4 else 2) * field
        extra_shift = 2 * field + rng.randrange(2)
        ops = {"$2": word, "$6": extra if bits == 3 else shift}
        if bits == 3:
            ops.update({"$10": shift, "$14": extra_shift})
        regs = run_ptx(asm, ops)
        got = [_half(regs["$0"] & 0xFFFF), _half(regs["$0"] >> 16), _half(regs["$1"] & 0xFFFF), _half(regs["$1"] >> 16)]
        for k in range(4):
            code = (word >> (shift + 8 * k)) & (15 if bits == 4 else 3)
            if bits == 3:
                code |= ((extra >> (extra_shift + 8 * k)) & 1) << 2
            assert got[k] == float(table[code].half()), (k, code)
