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
def test_ptx_decodes_four_independent_elements(bits):
    """Each of the four elements has its own word and shift, as Triton packs
    elements that are neighbours in registers, not bytes of one word."""
    table = TurboQuantCodec(bits, 128, seed=1).table
    asm = decode_asm(bits, table)
    rng = random.Random(bits)
    fields = 2 if bits == 4 else 4
    for _ in range(300):
        words = [rng.getrandbits(32) for _ in range(4)]
        extras = [rng.getrandbits(32) for _ in range(4)]
        shifts, extra_shifts = [], []
        for _ in range(4):
            field, byte = rng.randrange(fields), rng.randrange(4)
            shifts.append((4 if bits == 4 else 2) * field + 8 * byte)
            extra_shifts.append(2 * field + rng.randrange(2) + 8 * byte)
        ops = {f"${2 + i}": words[i] for i in range(4)}
        if bits == 3:
            ops.update({f"${6 + i}": extras[i] for i in range(4)})
            ops.update({f"${10 + i}": shifts[i] for i in range(4)})
            ops.update({f"${14 + i}": extra_shifts[i] for i in range(4)})
        else:
            ops.update({f"${6 + i}": shifts[i] for i in range(4)})
        regs = run_ptx(asm, ops)
        got = [_half(regs["$0"] & 0xFFFF), _half(regs["$0"] >> 16), _half(regs["$1"] & 0xFFFF), _half(regs["$1"] >> 16)]
        for i in range(4):
            code = (words[i] >> shifts[i]) & (15 if bits == 4 else 3)
            if bits == 3:
                code |= ((extras[i] >> extra_shifts[i]) & 1) << 2
            assert got[i] == float(table[code].half()), (i, code)
