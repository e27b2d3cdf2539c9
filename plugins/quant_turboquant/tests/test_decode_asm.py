"""The PTX decoders (kernel ``LOOKUP == 2``, and the Gluon kernel's) run through a small simulator of
the instructions they use, against the table lookup they stand for. (The
CPU interpreter cannot run PTX; the GPU benchmark checks the kernel itself.)"""
import random
import re
import struct

import pytest
import torch

from kernelplane_quant_turboquant import gluon_decode, packing
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
        split = re.fullmatch(r"mov\.b32\s+\{\s*(\w+)\s*,\s*(\w+)\s*\}\s*,\s*(\S+)", line)
        if split:  # a 32-bit register into its low and high 16 bits
            word = value(split.group(3))
            regs[split.group(1)], regs[split.group(2)] = word & 0xFFFF, word >> 16
            continue
        join = re.fullmatch(r"mov\.b32\s+(\S+)\s*,\s*\{\s*(\w+)\s*,\s*(\w+)\s*\}", line)
        if join:
            regs[join.group(1)] = value(join.group(2)) | value(join.group(3)) << 16
            continue
        dst, *src = [a.strip() for a in args.split(",")]
        v = [value(s) for s in src]
        if op in ("mov.b32", "mov.b16"):
            r = v[0]
        elif op == "mul.rn.f16":  # IEEE float16 product, subnormals kept
            halves = torch.tensor([(x ^ 0x8000) - 0x8000 for x in v], dtype=torch.int16).view(torch.float16)
            product = (halves[0] * halves[1]).view(torch.int16)
            r = int(product) & 0xFFFF
        elif op == "shr.b32":
            r = v[0] >> v[1]
        elif op == "shl.b32":
            r = v[0] << v[1]
        elif op == "shf.l.wrap.b32":  # the top 32 bits of {b, a} << (c mod 32)
            r = ((v[1] << 32 | v[0]) << (v[2] & 31)) >> 32
        elif op == "and.b32":
            r = v[0] & v[1]
        elif op == "xor.b32":
            r = v[0] ^ v[1]
        elif op in ("mul.rn.f16x2", "fma.rn.f16x2"):  # per 16-bit half, rounded once, subnormals kept
            r = 0
            for half in range(2):
                x = [torch.tensor([(a >> 16 * half) & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.float16)
                     .double() for a in v]
                exact = x[0] * x[1] + (x[2] if op.startswith("fma") else 0)
                r |= (int(exact.to(torch.float16).view(torch.int16)) & 0xFFFF) << 16 * half
        elif op == "or.b32":
            r = v[0] | v[1]
        elif op == "mad.lo.u32":
            r = v[0] * v[1] + v[2]
        elif op == "prmt.b32":
            r = _prmt(v[0], v[1], v[2])
        elif op == "lop3.b32":  # bit i of the result: bit (a_i << 2 | b_i << 1 | c_i) of the table
            r = sum(((v[3] >> ((v[0] >> i & 1) << 2 | (v[1] >> i & 1) << 1 | (v[2] >> i & 1))) & 1) << i
                    for i in range(32))
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


def _signed_byte(word, i):
    byte = (word >> (8 * i)) & 0xFF
    return byte - 256 if byte & 0x80 else byte


@pytest.mark.parametrize("bits", [2, 3])
def test_int8_key_centroids_are_the_table(bits):
    """The tables' shapes (3 : 10, 1 : 3 : 5 : 8; ``shapes``) put their centroids on an int8 grid exactly."""
    for dim in (64, 128):
        table = TurboQuantCodec(bits, dim, seed=1).table.tolist()
        words, step = gluon_decode.int8_centroids(table)
        assert len(words) == 2 ** bits // 4
        ints = [_signed_byte(words[i // 4], i % 4) for i in range(2 ** bits)]
        assert max(abs(v) for v in ints) <= 127
        for got, want in zip(ints, table):
            assert got * step == pytest.approx(want, rel=1e-6)


def test_gluon_key_decoder_and_query_order():
    """KEY_ASM's outputs against the codes it stands for, and the dimension the kernel
    pairs each output byte with (``_load_query_operand``: byte ``2o + i // 2``, field
    ``h + 2 (i % 2)``, dimension ``f * FW + 4 w + b`` for head dim ``4 FW``)."""
    table = TurboQuantCodec(2, 128, seed=1).table.tolist()
    (word_table,), _ = gluon_decode.int8_centroids(table)
    centroid = [_signed_byte(word_table, c) for c in range(4)]
    rng = random.Random(7)
    fw = 32
    for _ in range(50):
        codes = [rng.randrange(4) for _ in range(4 * fw)]
        row = packing.pack(torch.tensor(codes), 2)  # the page row the kernel reads
        for r in range(2 * fw):
            h, w, i = r // fw, r % fw // 4, r % 4
            word = int.from_bytes(bytes(row[4 * w:4 * w + 4].tolist()), "little")
            regs = run_ptx(gluon_decode.KEY_ASM, {"$2": word, "$6": word_table & MASK, "$10": 2 * h})
            for out in range(2):
                dim = (h + 2 * (i % 2)) * fw + 4 * w + 2 * out + i // 2
                assert _signed_byte(regs[f"${out}"], i) == centroid[codes[dim]]


def test_gluon_value_decoder_pairs_two_keys_for_two_bytes():
    table = TurboQuantCodec(2, 128, seed=1).table
    unit = gluon_decode.value_unit(table, 2)
    rng = random.Random(8)
    asm = gluon_decode.value_asm(2)
    (value_table,) = gluon_decode.value_tables(2)
    for _ in range(200):
        words, j0, j1 = [rng.getrandbits(32) for _ in range(2)], rng.randrange(4), rng.randrange(4)
        regs = run_ptx(asm, {"$8": words[0], "$9": words[1], "$12": j0 | (4 + j0) << 4 | j1 << 8 | (4 + j1) << 12,
                             "$16": value_table & MASK})
        for f in range(4):
            for out, byte in ((2 * f, j0), (2 * f + 1, j1)):
                got = [_half(regs[f"${out}"] & 0xFFFF), _half(regs[f"${out}"] >> 16)]
                for key in range(2):
                    code = (words[key] >> (8 * byte + 2 * f)) & 3
                    assert got[key] == gluon_decode.VALUE_CENTROIDS[2][code]
                    assert got[key] * unit == pytest.approx(float(table[code]), rel=1e-6)


def test_the_value_decoder_refuses_a_table_off_its_shape():
    with pytest.raises(ValueError, match="shape 3 : 10"):
        gluon_decode.value_unit(torch.tensor([0.4528, 1.5104, -0.4528, -1.5104]), 2)


def _row_words(row: torch.Tensor) -> list[int]:
    data = bytes(row.tolist())
    return [int.from_bytes(data[4 * w:4 * w + 4], "little") for w in range(len(data) // 4)]


@pytest.mark.parametrize("dim", [64, 128])
def test_gluon_3_bit_key_decoder_and_query_order(dim):
    """KEY_ASM_3 against the codes it stands for, at the dimensions the kernel pairs its output
    bytes with (the 2-bit order: the low bits are packed as 2-bit codes are): the main word,
    its extra word ``WORDS + w % (WORDS / 2)`` and the rotation ``2 - 2h - e`` the kernel
    gives each operand row."""
    table = TurboQuantCodec(3, dim, seed=1).table.tolist()
    (lo, hi), _ = gluon_decode.int8_centroids(table)
    centroid = [_signed_byte((lo, hi)[c // 4], c % 4) for c in range(8)]
    rng = random.Random(9)
    fw, words = dim // 4, dim // 16
    for _ in range(20):
        codes = [rng.randrange(8) for _ in range(dim)]
        row = _row_words(packing.pack(torch.tensor(codes), 3))
        for r in range(2 * fw):
            h, w, i = r // fw, r % fw // 4, r % 4
            e = w // (words // 2)
            regs = run_ptx(gluon_decode.KEY_ASM_3, {"$2": row[w], "$6": row[words + w % (words // 2)],
                                                     "$10": lo & MASK, "$14": hi & MASK, "$18": 2 * h,
                                                     "$22": (2 - 2 * h - e) & 31})
            for out in range(2):
                d = (h + 2 * (i % 2)) * fw + 4 * w + 2 * out + i // 2
                assert _signed_byte(regs[f"${out}"], i) == centroid[codes[d]], (r, out)


@pytest.mark.parametrize("dim", [64, 128])
def test_gluon_4_bit_key_decoder_and_query_order(dim):
    """KEY_ASM_4 on the word of the half each operand row reads (``h = r // FW``): byte ``i``
    of output ``o`` is a centroid's int8 step count less a half (``key_tables``) at the 2-bit
    order's dimension."""
    table = TurboQuantCodec(4, dim, seed=1).table.tolist()
    (lo, hi), step = gluon_decode.key_tables(torch.tensor(table), 4)
    rng = random.Random(11)
    fw, words = dim // 4, dim // 16
    for _ in range(20):
        codes = [rng.randrange(16) for _ in range(dim)]
        row = _row_words(packing.pack(torch.tensor(codes), 4))
        for r in range(2 * fw):
            h, w, i = r // fw, r % fw // 4, r % 4
            regs = run_ptx(gluon_decode.KEY_ASM_4, {"$2": row[h * words + w], "$6": lo & MASK, "$10": hi & MASK})
            for out in range(2):
                d = (h + 2 * (i % 2)) * fw + 4 * w + 2 * out + i // 2
                assert (_signed_byte(regs[f"${out}"], i) + 0.5) * step == pytest.approx(table[codes[d]], rel=1e-6)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dim", [64, 128])
def test_gluon_wide_value_decoders(bits, dim):
    """value_asm(3 / 4) on two keys' page rows: field f of operand row m (main word
    ``m % WORDS``, byte ``m // WORDS``) is dimension ``f * FW + 4 (m % WORDS) + m // WORDS``,
    each centroid exact in float16. 3 bits read each main word's top bits from an extra word
    (one per two main words), 4 bits read the row's second half as the 2-bit fields."""
    table = TurboQuantCodec(bits, dim, seed=1, role="value").table
    unit = gluon_decode.value_unit(table, bits)
    lo, hi = gluon_decode.value_tables(bits)
    rng = random.Random(10 + bits)
    fw, words = dim // 4, dim // 16
    asm = gluon_decode.value_asm(bits)
    for _ in range(40):
        codes = [[rng.randrange(1 << bits) for _ in range(dim)] for _ in range(2)]
        rows = [_row_words(packing.pack(torch.tensor(c), bits)) for c in codes]
        m, j1 = rng.randrange(fw), rng.randrange(4)  # j1: the byte of operand row m + 8, the same word
        w, j0 = m % words, m // words
        second = words + (w % (words // 2) if bits == 3 else w)
        operands = {"$8": rows[0][w], "$9": rows[1][w], "$12": rows[0][second], "$13": rows[1][second],
                    "$16": j0 | (4 + j0) << 4 | j1 << 8 | (4 + j1) << 12}
        if bits == 3:  # which byte pair of the extra word belongs to this main word
            operands.update({"$20": w // (words // 2), "$24": lo & MASK, "$28": hi & MASK})
        else:
            operands.update({"$20": lo & MASK, "$24": hi & MASK})
        regs = run_ptx(asm, operands)
        for f in range(4):
            for out, byte in ((2 * f, j0), (2 * f + 1, j1)):
                got = [_half(regs[f"${out}"] & 0xFFFF), _half(regs[f"${out}"] >> 16)]
                for key in range(2):
                    code = codes[key][f * fw + 4 * w + byte]
                    assert got[key] == gluon_decode.VALUE_CENTROIDS[bits][code]
                    assert got[key] * unit == pytest.approx(float(table[code]), rel=1e-6)


def test_gluon_decoders_refuse_other_widths():
    with pytest.raises(ValueError, match="2-, 3- or 4-bit"):
        gluon_decode.value_asm(1)
    with pytest.raises(ValueError, match="shape 1 : 3 : 5 : 8"):
        gluon_decode.value_unit(torch.tensor([0.25, 0.76, 1.34, 2.15, -0.25, -0.76, -1.34, -2.15]), 3)
