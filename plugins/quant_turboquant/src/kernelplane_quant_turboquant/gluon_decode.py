"""TurboQuant decode attention in Gluon (2, 3, 4 bits): code words decoded straight into tensor-core operands.

``kernels.turboquant_attention_kernel`` is bound by instruction issue. Gluon
(Triton's layer where a kernel names its layouts) lets this kernel decode each
thread's code words directly into the registers ``mma.sync`` reads, so its
loop touches no shared memory and spends about 2.0 instructions per K/V
element at 2 bits, 2.4 at 3 (``bench_turboquant_gluon.py --count``):

- scores ``S = Q K^T`` on int8 tensor cores (m16n8k32). One ``prmt`` turns
  four key codes into four int8 centroids (``KEY_ASM``, table from
  ``int8_centroids``), which is one operand register. The queries (rotated)
  are two int8 parts, ``128 hi + lo``, so their rounding stays far below the
  scores' bfloat16 precision (next item); their columns follow the order the
  decoder emits (``_load_query_operand``), since a dot product may sum its
  dims in any order;
- the GQA group's heads are rows 0-7 of the 16-row score tile with the
  queries' high parts, rows 8-15 the same heads with their low parts, so one
  product gives both and a thread holds a head's two rows (groups of at most
  8);
- values go through ``O^T = V^T P^T`` (m16n8k16, float16): the dimensions
  are the rows, the group's heads the 8 columns, so the accumulators hold no
  padding, and ``P^T`` is the score tile's registers as they are. A value
  register pairs two neighbouring keys of one dimension: one ``prmt``
  gathers a byte of two keys' words, a shift and a ``lop3`` turn each field's
  codes into ``prmt`` selectors, and two ``prmt`` look up the high bytes of
  the float16 centroids, whose low bytes are zero (``value_asm``; the
  codebooks' shapes, 3 : 10 and 1 : 3 : 5 : 8, allow it, ``shapes``);
- 3-bit codes are 2-bit codes plus a part of top bits (``packing``), laid out
  so that a main word's top bits sit in one extra word at one offset: the
  decoders read both words and move the top bits into their selectors (one
  rotation, one mask, one ``lop3`` more per word; ``KEY_ASM_3``, ``value_asm``),
  so the query order and the outputs' dimensions are the 2-bit ones;
- 4-bit codes: the row's two halves play the 2-bit fields, each word's eight
  codes decoded in place (``KEY_ASM_4``, ``value_asm``); the codebook's shape
  (odd integers, ``shapes``) makes a negative centroid's byte the complement of
  its magnitude's, so one sign mask per register makes it, the keys' centroids
  are half a step off the int8 grid (each score gets half the query's sum
  added) and the values come out of float16 arithmetic on the looked-up byte;
- a step is 32 keys read as two runs of 16, each from one page, so every
  address is a page base plus an offset fixed for the whole loop; the next
  step's codes and norms load while this one decodes, the norms as 32-bit
  words of token pairs until used (``_norms``);
- only a split's first and last steps mask keys out of range; the steps
  between skip the masks and run two per loop iteration (``UNROLL``);
- the running maximum moves only when a score exceeds it by more than
  ``RESCALE_SLACK``, so most steps skip the accumulators' rescale; each thread
  sums its own share of the softmax denominators, added up once at the end;
- the decoders' selector halves move down by a float16 multiply on the FMA
  pipe (``_high_half``), not a shift on the integer pipe, the loop's bound;
- one warp per program, 168 registers per thread at 2 bits (12 programs
  resident per SM), 255 at 3 and 4 (8; ``MAX_REGISTERS``); KV splits make two
  whole rounds of resident programs where the batch allows (``ROUNDS``), one
  where two would leave splits short
  (``MIN_KEYS_PER_SPLIT_FOR_ROUNDS``).

Decode steps only (one query token per sequence), no sliding window, head
dims 64 or 128 (the ones tested), pages a multiple of 16 tokens. Its partial
outputs have the Triton kernel's layout, so ``kernels.combine_splits_kernel``
merges and de-rotates them; the exact tail is read by programs of its own
in the same launch (``_tail_partial``, plain bfloat16 / float16 products).
Measured against the Triton kernel and SDPA in
``benchmarks/bench_turboquant_gluon.py``. Triton's CPU interpreter cannot run
Gluon: on a CPU the tests compile it for sm_90 and run its PTX through a
simulator (``tests/test_decode_asm.py``), and the GPU runs the kernel tests.
"""
from __future__ import annotations

import torch

from kernelplane_quant_turboquant.shapes import SHAPES, check_shape

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # a Triton without Gluon: the backend never plans this kernel
    gluon = None

BLOCK_N = 32  # keys per step: two reads of BLOCK_N / 2 keys, each from one page
PAGE_MULTIPLE = BLOCK_N // 2  # so pages must hold a multiple of this many tokens
# Registers per thread, by bits. 2 bits: 168, 12 programs resident per SM at head dim 128
# (the compiler's own choice, 209: 9). 3 bits: the extra words and their offsets need more;
# under 232 the loop spills at head dim 128, and 255 holds as many programs (8) as 232 and
# was 3 % faster (H200, 2026-12-03; 168: 30 % slower).
MAX_REGISTERS = {2: 168, 3: 255, 4: 255}


def max_registers(bits: int) -> int:
    return MAX_REGISTERS[bits]
# KV splits fill the GPU this many times over (whole rounds of resident programs). More
# splits cost the combine more partials; fewer leave SMs idle (measured, BENCHMARKS.md).
ROUNDS = 2
# ... but one round where more would leave a split fewer keys than this: a short program
# pays its prologue, its epilogue and its partial's share of the combine on few steps
# (H200, 2026-12-03: one round 10 % faster at batch 4 x 32k, two 1.7 % at 8 x 128k).
MIN_KEYS_PER_SPLIT_FOR_ROUNDS = 2048
UNROLL = 2  # unmasked steps per iteration of the kernel's main loop (two: the loop ends with at most one)
# Base-2 log: softmax weights grow up to 2^8 before the running maximum moves. The weights
# times value norms times ``value_unit`` / sqrt(head dim) go through float16, so value norms
# must stay below about 6000 (head dim 64; LLM value norms are tens).
RESCALE_SLACK = 8.0


def resident_per_sm(max_registers: int) -> int:
    """One-warp programs an SM holds at once under a register cap: its 65536 registers over
    32 threads x ``max_registers`` (the kernel uses no shared memory)."""
    return 65536 // (32 * max_registers)


# The value decoder's centroids in its own units, in code order. 2 and 3 bits: float16
# numbers whose low bytes are zero (``shapes``: 2-bit tables are ``(3u, 10u, -3u, -10u)``,
# 3-bit ones ``(1, 3, 5, 8, -1, -3, -5, -8) u``), so ``prmt`` looks up their high bytes, four
# per word. 4 bits: the shape's odd integers and their negatives (``value_asm``).
VALUE_CENTROIDS = {2: (1.5, 5.0, -1.5, -5.0), 3: (1.0, 3.0, 5.0, 8.0, -1.0, -3.0, -5.0, -8.0),
                   4: SHAPES["value"][4] + tuple(-s for s in SHAPES["value"][4])}


def _byte_words(values) -> tuple[int, ...]:
    """Bytes, four per word (signed int32 arguments)."""
    return tuple(_signed32(sum((b & 0xFF) << (8 * i) for i, b in enumerate(values[w:w + 4])))
                 for w in range(0, len(values), 4))


def _high_byte_words(values) -> tuple[int, ...]:
    """The float16 ``values``' high bytes, four per word (signed int32 arguments); raises
    unless every low byte is zero."""
    bits = [int(torch.tensor(v, dtype=torch.float16).view(torch.int16)) & 0xFFFF for v in values]
    if any(b & 0xFF for b in bits):
        raise ValueError(f"value centroids {values} have nonzero low bytes in float16")
    return tuple(_signed32(sum((b >> 8) << (8 * i) for i, b in enumerate(bits[w:w + 4])))
                 for w in range(0, len(bits), 4))


def value_tables(bits: int) -> tuple[int, ...]:
    """The words ``value_asm(bits)`` looks centroids up in (one for 2 bits, two for 3 and 4)."""
    if bits == 4:  # byte 127 - (s - 1) / 2 for magnitude s: the decoder makes 255 - 2 * byte
        return _byte_words([127 - (m - 1) // 2 for m in SHAPES["value"][4]])
    return _high_byte_words(VALUE_CENTROIDS[bits])


def value_unit(table, bits: int) -> float:
    """What one unit of the value decoder's centroids is in the ``bits``-bit ``table``'s units."""
    check_shape(table, bits, "value")
    return float(table[0]) / VALUE_CENTROIDS[bits][0]


def _high_half(dst: str, src: str) -> list[str]:
    """PTX putting the high 16 bits of ``src`` in the low 16 bits of ``dst`` (its high bits
    undefined; ``prmt`` reads only the low 16 bits of its selector). A float16 multiply by
    one that swizzles the high half in, instead of a shift: the multiply issues on the FMA
    pipe, and the decoders' shifts, masks and lookups keep the integer pipe busy (the
    kernel's bound). Exact for every selector here: their halves are finite float16
    patterns (no exponent of all ones), subnormals included, since the float16 multiply
    keeps subnormals."""
    return ["mov.b16 one, 0x3C00;", f"mov.b32 {{lo, hi}}, {src};", "mul.rn.f16 hi, hi, one;",
            f"mov.b32 {dst}, {{hi, hi}};"]


def value_asm(bits: int = 2) -> str:
    """PTX decoding two keys' value words into the four fields' float16 centroids of two
    bytes. Inputs: ``$8, $9`` the two keys' words (elements 0 and 1; elements 2 and 3
    repeat them), then the gather selector ``j0 | (4 + j0) << 4 | j1 << 8 | (4 + j1) << 12``
    for bytes ``j0`` (elements 0, 1) and ``j1`` (elements 2, 3), then the table
    (``value_tables``): for 2 bits ``$12`` and ``$16``; for 3 bits ``$12, $13`` the two
    keys' extra words (``packing``: the codes' top bits), the selector ``$16``, ``$20`` the
    extra words' bit offset (0 or 1) and the table ``$24, $28``.
    Outputs ``$2f`` / ``$2f+1``: field ``f`` of byte ``j0`` / ``j1`` of the two keys (the
    first key in the low half). One ``prmt`` gathers the four bytes into one register
    (for 3 bits another the extra words' bytes, where field ``f``'s top bits sit at bit
    ``2f`` plus the offset). Then, per field, shifts put its two low bits at bits 4-5 of
    each byte (and its top bit at bit 6) and ``lop3`` keeps them and sets bit 3: each byte
    becomes the ``prmt`` selector pair (low byte: nibble 8, the sign of table byte 0, a
    positive centroid: zero; high byte: the code), and ``prmt`` reads the low 16 bits of
    its selector (bytes 0 and 1), then of the selector's high half moved down (bytes 2,
    3; ``_high_half``)."""
    if bits == 4:
        return _value_asm_4()
    if bits not in (2, 3):
        raise ValueError(f"the Gluon value decoder reads 2-, 3- or 4-bit codes, got {bits}")
    gather, low, high = ("$12", "$16", "$16") if bits == 2 else ("$16", "$24", "$28")
    lines = ["{", ".reg .b32 x, y, t, u, s0, s1;", ".reg .b16 lo, hi, one;", f"prmt.b32 x, $8, $9, {gather};"]
    if bits == 3:
        lines += [f"prmt.b32 y, $12, $13, {gather};", "shr.b32 y, y, $20;"]
    for f in range(4):
        shift, source = 4 - 2 * f, "x"
        if shift:
            lines.append(f"shl.b32 t, x, {shift};" if shift > 0 else f"shr.b32 t, x, {-shift};")
            source = "t"
        # lop3 0xEA: (a & b) | c
        lines.append(f"lop3.b32 s0, {source}, 0x30303030, 0x08080808, 0xEA;")
        if bits == 3:  # the top bit, at bit 2f of y's bytes, to bit 6
            top = "y"
            if f < 3:
                lines.append(f"shl.b32 u, y, {6 - 2 * f};")
                top = "u"
            lines.append(f"lop3.b32 s0, {top}, 0x40404040, s0, 0xEA;")
        lines += [f"prmt.b32 ${2 * f}, {low}, {high}, s0;", *_high_half("s1", "s0"),
                  f"prmt.b32 ${2 * f + 1}, {low}, {high}, s1;"]
    return "\n".join(lines + ["}"])


def _value_asm_4() -> str:
    """PTX decoding two keys' 4-bit value codes into float16 centroids (the shape's odd
    integers, ``VALUE_CENTROIDS[4]``). The row's two halves play the 2-bit fields: field
    ``f`` of byte ``j`` is the low (``f`` 0, 1) or high (2, 3) nibble of byte ``j`` of the
    first (``f`` even) or second half's word. Inputs: ``$8, $9`` the two keys' first-half
    words, ``$12, $13`` their second-half words, ``$16`` the gather selector (as 2 bits),
    ``$20, $24`` the table (``value_tables(4)``: byte ``127 - (s - 1) / 2`` for magnitude
    ``s``). Per field a ``lop3`` makes the magnitudes' selectors (low nibble the magnitude,
    high nibble 8: the sign of table byte 0, zero) and ``prmt`` looks up ``[t_a, 0, t_b, 0]``;
    a negative code complements its byte (a ``prmt`` replicating the codes' sign bits, a
    ``lop3``), so both signs give ``255 - 2 * byte`` = the centroid: the register, two
    float16 subnormals ``byte * 2^-24``, times ``2^12`` then times ``-2^13`` plus 255 (both
    exact; on the FMA pipe)."""
    lines = ["{", ".reg .b32 x, y, ux, uy, t, s0, s1, r, m, k0, k1, k2;", ".reg .b16 lo, hi, one;",
             "mov.b32 k0, 0x6C006C00;", "mov.b32 k1, 0xF000F000;", "mov.b32 k2, 0x5BF85BF8;",  # 2^12, -2^13, 255
             "prmt.b32 x, $8, $9, $16;", "prmt.b32 y, $12, $13, $16;", "shl.b32 ux, x, 4;", "shl.b32 uy, y, 4;"]
    for f in range(4):
        source, high = ("x", "y")[f % 2], f >= 2
        signs = source if high else "u" + source  # each code's sign at bit 7 of its byte
        if high:
            lines.append(f"shr.b32 t, {source}, 4;")
            source = "t"
        # lop3 0xEA: (a & b) | c; 0x78: a ^ (b & c)
        lines.append(f"lop3.b32 s0, {source}, 0x07070707, 0x80808080, 0xEA;")
        for out, sel, mask in ((2 * f, "s0", "0x9988"), (2 * f + 1, "s1", "0xBBAA")):
            if sel == "s1":
                lines += _high_half("s1", "s0")
            lines += [f"prmt.b32 r, $20, $24, {sel};", f"prmt.b32 m, {signs}, {signs}, {mask};",
                      "lop3.b32 r, r, m, 0x00FF00FF, 0x78;", "mul.rn.f16x2 r, r, k0;",
                      f"fma.rn.f16x2 ${out}, r, k1, k2;"]
    return "\n".join(lines + ["}"])


# Key codes decode to int8 for an int8 score product: one ``prmt`` turns four codes into
# four int8 centroids, as an int8 operand register holds four elements. ``$2``: a word of
# code bytes (four bytes of a key row; the call's four elements share it); ``$6``: the
# table, four int8 centroids in code order; ``$10``: a shift, 0 or 2. After the shift a
# mask keeps fields ``h`` and ``h + 2`` (``h`` = shift / 2) of bytes 0 and 1 as the four
# low selector nibbles, and the high half moved down gives bytes 2 and 3 (``prmt`` reads
# the low 16 bits of its selector; ``_high_half``). Output ``$o``, byte ``i``: byte ``2 * o + i // 2``, field
# ``h + 2 * (i % 2)`` of the word.
KEY_ASM = "\n".join([
    "{", ".reg .b32 m, t;", ".reg .b16 lo, hi, one;", "shr.b32 m, $2, $10;", "and.b32 m, m, 0x33333333;",
    "prmt.b32 $0, $6, $6, m;", *_high_half("t", "m"), "prmt.b32 $1, $6, $6, t;", "}"])
# 3 bits: as 2 bits, with each selector nibble's bit 2 the code's top bit, from the main
# word's extra word ``$6`` (``packing``), where the top bits of fields ``h`` and ``h + 2``
# of byte ``i`` sit at bits ``2h + e`` and ``2h + 4 + e`` of its byte ``i`` (``e``: 0 or 1,
# which half of the main words the word is in): a rotation left by ``$22`` = ``2 - 2h - e``
# (mod 32) takes both to bit 2 of their nibbles. The table is eight int8 centroids in
# ``$10, $14``; ``$18``: the shift.
KEY_ASM_3 = "\n".join([
    "{", ".reg .b32 m, e, t;", ".reg .b16 lo, hi, one;", "shr.b32 m, $2, $18;", "shf.l.wrap.b32 e, $6, $6, $22;",
    "and.b32 e, e, 0x44444444;", "lop3.b32 m, m, 0x33333333, e, 0xEA;", "prmt.b32 $0, $10, $14, m;",
    *_high_half("t", "m"), "prmt.b32 $1, $10, $14, t;", "}"])
# 4 bits: the row's two halves play the 2-bit fields (a program reads word ``w`` of the half
# its operand row asks for), and each word's eight codes are decoded in place: output
# ``$o``, byte ``i``: nibble ``4o + i``. The magnitudes (the low 3 bits) select bytes of the
# table ``$6, $10`` (``key_tables``); a negative code's byte is complemented, by its sign
# bit replicated into a mask (``prmt`` in sign mode on the word and the word shifted by 4,
# which puts the low nibbles' sign bits at bit 7).
KEY_ASM_4 = "\n".join([
    "{", ".reg .b32 m, u, a, b, s, t;", ".reg .b16 lo, hi, one;", "and.b32 m, $2, 0x77777777;", "shl.b32 u, $2, 4;",
    "prmt.b32 a, $6, $10, m;", *_high_half("t", "m"), "prmt.b32 b, $6, $10, t;",
    "prmt.b32 s, u, $2, 0xD9C8;", "xor.b32 $0, a, s;", "prmt.b32 s, u, $2, 0xFBEA;", "xor.b32 $1, b, s;", "}"])
KERNEL_ASM = {2: {"KA": KEY_ASM, "VA": value_asm(2)}, 3: {"KA": KEY_ASM_3, "VA": value_asm(3)},
              4: {"KA": KEY_ASM_4, "VA": value_asm(4)}}  # by bits


def _signed32(word: int) -> int:
    """A 32-bit pattern as the signed value a kernel's int32 argument carries."""
    return word - (1 << 32) if word >= 1 << 31 else word


def key_tables(table, bits: int) -> tuple[tuple[int, ...], float]:
    """(the words ``KERNEL_ASM[bits]["KA"]`` looks key centroids up in, the value of one int8
    step in the score product). 2 and 3 bits: the centroids as int8 (``int8_centroids``).
    4 bits: the eight magnitudes ``s`` of the shape (odd integers, ``shapes``) as bytes
    ``(s - 1) / 2``, a negative centroid their complement ``-(s + 1) / 2``: so every centroid is
    ``(byte + 1/2)`` steps, and the kernel adds half the query's sum to each score."""
    if bits != 4:
        check_shape(table, bits, "key")  # so that the int8 steps are exact
        return int8_centroids(table)
    unit = check_shape(table, 4, "key")
    return _byte_words([(m - 1) // 2 for m in SHAPES["key"][4]]), 2 * unit


def int8_centroids(table) -> tuple[tuple[int, ...], float]:
    """(the centroids as int8 bytes, four per int32 word, the value of one int8 step): the
    step, among those putting the largest centroid at 64..127 steps, whose rounding moves
    the centroids least relative to their size (exact for the tables' shapes, ``shapes``)."""
    values = [float(v) for v in table]
    top = max(abs(v) for v in values)
    best = min((max(abs(v - round(v * n / top) * top / n) / max(abs(v), 1e-30) for v in values), n)
               for n in range(64, 128))[1]
    step = top / best
    return _byte_words([round(v / step) for v in values]), step


def _jit(fn):
    return gluon.jit(fn) if gluon is not None else fn


@_jit
def _round_int8(x):
    return gl.where(x >= 0.0, x + 0.5, x - 0.5).to(gl.int8)


@_jit
def _norms(words, like):
    """The float16 norms in ``words`` (``[2, HALF // 4]`` words, each a pair of tokens: token
    ``2 * (i * HALF // 4 + j) + h`` in half ``h`` of word ``[i, j]``) as float32, in the layout
    of ``like`` (``[HALF]``, one per token). Prefetched norms stay words until here: loaded as
    float16 values, they were re-paired for the score layout right after their load, and
    every step stalled on that load."""
    lo = words.to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    hi = (words >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    return gl.convert_layout(gl.reshape(gl.join(lo, hi), [like.shape[0]]), like.type.layout)


@_jit
def _query_parts(x, high_rows):
    """``x`` in [-127, 127] as int8 ``hi`` where ``high_rows``, else ``lo``, with
    ``x ~ hi + lo / 128`` (|lo| <= 64)."""
    hi = _round_int8(x)
    return gl.where(high_rows, hi, _round_int8((x - hi.to(gl.float32)) * 128.0))


@_jit
def _part_sums(x):
    """Per row of ``x`` (as ``_query_parts`` splits it), ``128 * sum(hi) + sum(lo)``: what a
    row's scores gain per unit added to every key element, as a float."""
    hi = _round_int8(x)
    lo = _round_int8((x - hi.to(gl.float32)) * 128.0)
    return (gl.sum(hi.to(gl.int32), 1) * 128 + gl.sum(lo.to(gl.int32), 1)).to(gl.float32)


@_jit
def _load_query_operand(q_rows, q_ok, offs_r, OUT: gl.constexpr, FW: gl.constexpr):
    """The query elements that ``KEY_ASM`` output ``OUT`` meets in the score product: column
    r is shift ``h = r // FW``, word ``w = r % FW // 4``, byte ``i = r % 4`` of the output,
    so dimension ``f * FW + 4 * w + b`` with ``b = 2 * OUT + i // 2``, ``f = h + 2 * (i % 2)``."""
    i = gl.expand_dims(offs_r % 4, 0)
    dims = (gl.expand_dims(offs_r // FW, 0) + 2 * (i % 2)) * FW + gl.expand_dims(4 * (offs_r % FW // 4), 0) + \
        2 * OUT + i // 2
    return gl.load(q_rows + dims, mask=q_ok, other=0.0)


@_jit
def _group_rows(x):
    """Rows 0..7 of a [16, N] tile in the score product's layout: the GQA group's heads
    (rows 8-15 hold the same heads' low-part scores, ``_scores``)."""
    top, _ = gl.split(gl.permute(gl.reshape(x, [2, 8, x.shape[1]]), [1, 2, 0]))
    return top


@_jit
def _load_keys(start, kv_hi, table_ptr, kc_head, vc_head, kn_head, vn_head, k_offsets, v_offsets, offs_nw, extra,
               stride_kcb: gl.constexpr, stride_kct: gl.constexpr, stride_vcb: gl.constexpr, stride_vct: gl.constexpr,
               stride_knb: gl.constexpr, stride_vnb: gl.constexpr, PAGE: gl.constexpr, BITS: gl.constexpr):
    """Codes and norms of keys ``start ..`` (half a step, one page): one block-table entry,
    every address that page's base plus an offset fixed for the whole loop. Keys past
    ``kv_hi`` in the page are read and masked later (the page exists); past the sequence's
    pages, block 0 is read instead. Norms come as the 32-bit words of their pairs
    (``_norms``; strides in words). Returns ``(key words, value words, key norms, value
    norms)``, then for 3 bits the extra words that go with the key and the value words, for
    4 bits the value words' second-half words (offsets in ``extra``, named in ``_codes_partial``)."""
    # Positions are never negative: an unsigned division skips the sign fix-ups (about 20
    # integer instructions per step), and the row comes from the quotient.
    page = (start.to(gl.uint32) // PAGE).to(gl.int32)
    block = gl.load(table_ptr + page, mask=start < kv_hi, other=0).to(gl.int64)
    row = gl.multiple_of(start - page * PAGE, 16)  # steps start at multiples of 16
    k_row = kc_head + (block * stride_kcb + row * stride_kct)
    v_row = vc_head + (block * stride_vcb + row * stride_vct)
    kb = gl.load(k_row + k_offsets)
    vw = gl.load(v_row + v_offsets)
    kn = gl.load(kn_head + (block * stride_knb + row // 2) + offs_nw)
    vn = gl.load(vn_head + (block * stride_vnb + row // 2) + offs_nw)
    if BITS == 3:
        codes = (kb, vw, kn, vn, gl.load(k_row + extra[0]), gl.load(v_row + extra[1]))
    elif BITS == 4:
        codes = (kb, vw, kn, vn, gl.load(v_row + extra[1]))
    else:
        codes = (kb, vw, kn, vn)
    return codes


@_jit
def _scores(codes, start, kv_lo, span, q0, q1, k_table, k_shift, extra, row_scale, offs_sn,
            KA: gl.constexpr, MMA: gl.constexpr, MASKED: gl.constexpr, BITS: gl.constexpr):
    """Base-2 scaled scores of the group's heads for half a step's keys ([8, keys]); with
    ``MASKED``, -inf outside ``kv_lo .. kv_lo + span - 1``; and that mask (unused, so not
    computed, where the step is not ``MASKED``). The product's rows 0-7 meet the queries'
    high parts, rows 8-15 their low parts (``_query_parts``). ``extra``: named in
    ``_codes_partial``."""
    if BITS == 3:
        k0, k1 = gl.inline_asm_elementwise(KA, "=r,=r" + ",r" * 24, [codes[0], codes[4], k_table, extra[2], k_shift,
                                                                     extra[3]],
                                           dtype=(gl.int8, gl.int8), is_pure=True, pack=4)
    elif BITS == 4:
        k0, k1 = gl.inline_asm_elementwise(KA, "=r,=r,r,r,r,r,r,r,r,r,r,r,r,r", [codes[0], k_table, extra[2]],
                                           dtype=(gl.int8, gl.int8), is_pure=True, pack=4)
    else:
        k0, k1 = gl.inline_asm_elementwise(KA, "=r,=r,r,r,r,r,r,r,r,r,r,r,r,r", [codes[0], k_table, k_shift],
                                           dtype=(gl.int8, gl.int8), is_pure=True, pack=4)
    s = mma_v2(q1, k1, mma_v2(q0, k0, gl.zeros([16, offs_sn.shape[0]], gl.int32, MMA)))
    hi, lo = gl.split(gl.permute(gl.reshape(s, [2, 8, s.shape[1]]), [1, 2, 0]))
    s = (hi * 128 + lo).to(gl.float32)
    if BITS == 4:  # centroids are (byte + 1/2) steps (``key_tables``)
        s = s + extra[6]
    s = (s * row_scale) * gl.expand_dims(_norms(codes[2], offs_sn), 0)
    ok = (start - kv_lo + offs_sn).to(gl.uint32) < span  # one unsigned compare for both ends
    if MASKED:
        s = s + gl.expand_dims(gl.where(ok, 0.0, float("-inf")), 0)
    return s, ok


@_jit
def _add_values(p, codes, ok, v_gather, v_table, extra, value_scale, acc0, acc1, acc2, acc3,
                VA: gl.constexpr, B: gl.constexpr, MASKED: gl.constexpr, BITS: gl.constexpr):
    """The accumulators (``O^T``: dimensions x the group's heads) plus the values of half a
    step's keys times ``p`` (their softmax weights, the group's heads x keys):
    ``O^T += V^T P^T``. ``P^T`` is ``p`` transposed: in ``p``'s registers, the layout the
    product takes as its right operand. ``extra``: named in ``_codes_partial``."""
    weight = _norms(codes[3], ok) * value_scale
    if MASKED:
        weight = gl.where(ok, weight, 0.0)  # masked norms may be any bits
    p_t = gl.convert_layout(gl.permute((p * gl.expand_dims(weight, 0)).to(gl.float16), [1, 0]), B)
    if BITS == 3:
        v0, v1, v2, v3 = gl.inline_asm_elementwise(
            VA, "=r,=r,=r,=r,=r,=r,=r,=r" + ",r" * 24, [codes[1], codes[5], v_gather, extra[5], v_table, extra[4]],
            dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=4)
    elif BITS == 4:
        v0, v1, v2, v3 = gl.inline_asm_elementwise(
            VA, "=r,=r,=r,=r,=r,=r,=r,=r" + ",r" * 20, [codes[1], codes[4], v_gather, v_table, extra[4]],
            dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=4)
    else:
        v0, v1, v2, v3 = gl.inline_asm_elementwise(
            VA, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r", [codes[1], v_gather, v_table],
            dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=4)
    return mma_v2(v0, p_t, acc0), mma_v2(v1, p_t, acc1), mma_v2(v2, p_t, acc2), mma_v2(v3, p_t, acc3)


@_jit
def _step(start, kv_lo, kv_hi, span, state, operands,
          stride_kcb: gl.constexpr, stride_kct: gl.constexpr, stride_vcb: gl.constexpr, stride_vct: gl.constexpr,
          stride_knb: gl.constexpr, stride_vnb: gl.constexpr, PAGE: gl.constexpr, BLOCK_N: gl.constexpr,
          KA: gl.constexpr, VA: gl.constexpr, MMA: gl.constexpr, B: gl.constexpr, MASKED: gl.constexpr,
          RESCALE_SLACK: gl.constexpr, BITS: gl.constexpr):
    """One step of ``BLOCK_N`` keys from ``start``: their codes and norms (loaded by the step
    before) into the running softmax and accumulators, while the next step's load.
    ``state``, returned updated: this step's codes and norms (``codes_a``, ``codes_b``: the
    two halves, ``_load_keys``; the next step's on return), the running maximum per head,
    each thread's share of the softmax denominators (``[8, HALF]``: summed over the
    threads once, after the last step, instead of in every step) and the accumulators.
    ``operands``: what every step reads the same (``_codes_partial`` names them).
    ``MASKED``: whether the step reaches outside ``kv_lo .. kv_hi - 1`` (only a split's
    first and last steps do; the others skip the masks)."""
    codes_a, codes_b, m_i, l_i, acc0, acc1, acc2, acc3 = state
    table_ptr, kc_head, vc_head, kn_head, vn_head, k_offsets, v_offsets, offs_nw, q0, q1, k_table, k_shift, \
        row_scale, offs_sn, v_gather, v_table, value_scale, extra = operands
    HALF: gl.constexpr = BLOCK_N // 2
    next_a = _load_keys(start + BLOCK_N, kv_hi, table_ptr, kc_head, vc_head, kn_head, vn_head, k_offsets, v_offsets,
                        offs_nw, extra, stride_kcb, stride_kct, stride_vcb, stride_vct, stride_knb, stride_vnb, PAGE,
                        BITS)
    next_b = _load_keys(start + BLOCK_N + HALF, kv_hi, table_ptr, kc_head, vc_head, kn_head, vn_head, k_offsets,
                        v_offsets, offs_nw, extra, stride_kcb, stride_kct, stride_vcb, stride_vct, stride_knb,
                        stride_vnb, PAGE, BITS)
    s_a, ok_a = _scores(codes_a, start, kv_lo, span, q0, q1, k_table, k_shift, extra, row_scale, offs_sn, KA, MMA,
                        MASKED, BITS)
    s_b, ok_b = _scores(codes_b, start + HALF, kv_lo, span, q0, q1, k_table, k_shift, extra, row_scale, offs_sn, KA,
                        MMA, MASKED, BITS)
    # The running maximum moves only when a row's scores exceed it by more than
    # RESCALE_SLACK (then p <= 2^RESCALE_SLACK): in a decode step it settles after a few
    # keys, and the accumulators are rescaled only in the steps where it moves.
    # One reduction over both halves (the halves share a layout): half the shuffles of two.
    m_tile = gl.max(gl.maximum(s_a, s_b), 1)
    m_new = gl.where(m_tile > m_i + RESCALE_SLACK, m_tile, m_i)
    alpha = gl.exp2(m_i - m_new)
    p_a = gl.exp2(s_a - gl.expand_dims(m_new, 1))
    p_b = gl.exp2(s_b - gl.expand_dims(m_new, 1))
    if gl.max(m_new - m_i, 0) > 0.0:
        l_i = l_i * gl.expand_dims(alpha, 1)
        rescale = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(0, acc0.type.layout)), 0)
        acc0 = acc0 * rescale
        acc1 = acc1 * rescale
        acc2 = acc2 * rescale
        acc3 = acc3 * rescale
    l_i = l_i + p_a + p_b
    acc0, acc1, acc2, acc3 = _add_values(p_a, codes_a, ok_a, v_gather, v_table, extra, value_scale,
                                         acc0, acc1, acc2, acc3, VA, B, MASKED, BITS)
    acc0, acc1, acc2, acc3 = _add_values(p_b, codes_b, ok_b, v_gather, v_table, extra, value_scale,
                                         acc0, acc1, acc2, acc3, VA, B, MASKED, BITS)
    return next_a, next_b, m_new, l_i, acc0, acc1, acc2, acc3


@_jit
def turboquant_decode_gluon(q_ptr, part_ptr, lse_ptr, kc_ptr, kn_ptr, vc_ptr, vn_ptr, k_int8, k_int8_hi, k_step,
                            v_table, v_table_hi, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, tk_ptr, tv_ptr,
                            seq_slots_ptr, tail_window, tail_capacity, num_kv_heads, score_scale, tail_score_scale,
                            value_scale, tokens_per_split,
                            stride_qt, stride_qh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_bt,
                            stride_tks, stride_tke, stride_tkh, stride_tvs, stride_tve, stride_tvh,
                            stride_kcb: gl.constexpr, stride_kct: gl.constexpr, stride_kch: gl.constexpr,
                            stride_knb: gl.constexpr, stride_knt: gl.constexpr, stride_knh: gl.constexpr,
                            stride_vcb: gl.constexpr, stride_vct: gl.constexpr, stride_vch: gl.constexpr,
                            stride_vnb: gl.constexpr, stride_vnt: gl.constexpr, stride_vnh: gl.constexpr,
                            GROUP: gl.constexpr, BLOCK_N: gl.constexpr, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr,
                            BITS: gl.constexpr, KA: gl.constexpr, VA: gl.constexpr, HAS_TAIL: gl.constexpr,
                            RESCALE_SLACK: gl.constexpr = RESCALE_SLACK, UNROLL: gl.constexpr = UNROLL):
    """Grid: (sequences, KV heads x (splits + 1 with the exact tail)); one warp. Decode only
    (at most one query token per sequence, at its last position, every earlier key
    visible). Writes the rotated partial outputs and base-2 log-sum-exp of each split in
    the layout of ``kernels.turboquant_attention_kernel``, so
    ``kernels.combine_splits_kernel`` merges and de-rotates them. ``HAS_TAIL``: the keys
    that the exact tail holds for the query (position 0 and the latest ``tail_window``,
    ``kernelplane.exact_tail``) are read from it by the first ``num_kv_heads`` programs
    (``_tail_partial``, written as the last split), the codes cover the rest.
    ``q_ptr``: queries already rotated (float32). ``kc_ptr``, ``vc_ptr``, ``kn_ptr``,
    ``vn_ptr``: the code and norm pages as 32-bit words (strides in words; the norms
    token-contiguous, two per word). ``BITS``: 2 or 3 (``KA``, ``VA``: ``KERNEL_ASM[BITS]``).
    ``k_int8, k_int8_hi, k_step``: the key centroids as int8 and the value of one int8 step
    (``int8_centroids``; ``k_int8_hi``: the second word, 3 bits); ``v_table, v_table_hi``:
    ``value_tables``.
    ``tail_score_scale``: for the tail's rows, which hold coordinates, not unit vectors."""
    program = gl.program_id(1)
    if HAS_TAIL:
        # The tail's programs come first, so that they never start last.
        if program < num_kv_heads:
            _tail_partial(q_ptr, part_ptr, lse_ptr, tk_ptr, tv_ptr, seq_slots_ptr, seq_lens_ptr,
                          query_start_loc_ptr, tail_window, tail_capacity, num_kv_heads, tail_score_scale,
                          stride_qt, stride_qh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                          stride_tks, stride_tke, stride_tkh, stride_tvs, stride_tve, stride_tvh, GROUP, HEAD_DIM)
        else:
            _codes_partial(program - num_kv_heads, q_ptr, part_ptr, lse_ptr, kc_ptr, kn_ptr, vc_ptr, vn_ptr, k_int8,
                           k_int8_hi, k_step, v_table, v_table_hi, block_tables_ptr, seq_lens_ptr,
                           query_start_loc_ptr, tail_window, tail_capacity, num_kv_heads, score_scale, value_scale,
                           tokens_per_split,
                           stride_qt, stride_qh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_bt,
                           stride_kcb, stride_kct, stride_kch, stride_knb, stride_knt, stride_knh,
                           stride_vcb, stride_vct, stride_vch, stride_vnb, stride_vnt, stride_vnh,
                           GROUP, BLOCK_N, PAGE, HEAD_DIM, BITS, KA, VA, HAS_TAIL, RESCALE_SLACK, UNROLL)
    else:
        _codes_partial(program, q_ptr, part_ptr, lse_ptr, kc_ptr, kn_ptr, vc_ptr, vn_ptr, k_int8, k_int8_hi, k_step,
                       v_table, v_table_hi, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, tail_window,
                       tail_capacity, num_kv_heads, score_scale, value_scale, tokens_per_split,
                       stride_qt, stride_qh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_bt,
                       stride_kcb, stride_kct, stride_kch, stride_knb, stride_knt, stride_knh,
                       stride_vcb, stride_vct, stride_vch, stride_vnb, stride_vnt, stride_vnh,
                       GROUP, BLOCK_N, PAGE, HEAD_DIM, BITS, KA, VA, HAS_TAIL, RESCALE_SLACK, UNROLL)


@_jit
def _tail_partial(q_ptr, part_ptr, lse_ptr, tk_ptr, tv_ptr, seq_slots_ptr, seq_lens_ptr, query_start_loc_ptr,
                  tail_window, tail_capacity, num_kv_heads, tail_score_scale,
                  stride_qt, stride_qh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                  stride_tks, stride_tke, stride_tkh, stride_tvs, stride_tve, stride_tvh,
                  GROUP: gl.constexpr, HEAD_DIM: gl.constexpr):
    """The exact tail's partial for one (sequence, KV head): position 0 and the positions
    from where the codes end up to the query's own, 16 rows per step on tensor cores
    (``kernelplane.exact_tail``: entry 0 holds position 0, entry ``1 + p % capacity``
    position ``p``). Scores from the query's two parts in the tail's dtype (so they are
    about float32-exact), weights and values in float16; written as the last split."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    ROWS: gl.constexpr = gl.SliceLayout(1, MMA)
    COLS: gl.constexpr = gl.SliceLayout(0, MMA)
    seq = gl.program_id(0)
    kv_head = gl.program_id(1)
    split = gl.num_programs(1) // num_kv_heads - 1
    seq_len = gl.load(seq_lens_ptr + seq)
    token = gl.load(query_start_loc_ptr + seq)
    has_query = gl.load(query_start_loc_ptr + seq + 1) > token
    # Rows t: position 0, then first .. seq_len - 1, where the codes end (as in _codes_partial).
    first = gl.maximum(seq_len - tail_window, gl.maximum(seq_len - tail_capacity, 1))
    rows = gl.where(has_query, 1 + seq_len - first, 0)
    slot = gl.load(seq_slots_ptr + seq).to(gl.int64)
    tk_head = tk_ptr + slot * stride_tks + kv_head.to(gl.int64) * stride_tkh
    tv_head = tv_ptr + slot * stride_tvs + kv_head.to(gl.int64) * stride_tvh

    offs_qm = gl.arange(0, 16, layout=gl.SliceLayout(1, A))
    offs_qd = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, A))
    q = gl.load(q_ptr + token.to(gl.int64) * stride_qt + gl.expand_dims((kv_head * GROUP + offs_qm) * stride_qh, 1) +
                gl.expand_dims(offs_qd, 0), mask=gl.expand_dims((offs_qm < GROUP) & has_query, 1), other=0.0)
    q_hi = q.to(tk_ptr.dtype.element_ty)
    q_lo = (q - q_hi.to(gl.float32)).to(tk_ptr.dtype.element_ty)

    offs_kd = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, B))  # K^T: dims x tail rows
    offs_kt = gl.arange(0, 16, layout=gl.SliceLayout(0, B))
    offs_vt = gl.arange(0, 16, layout=gl.SliceLayout(1, B))  # V: tail rows x dims
    offs_vd = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, B))
    offs_st = gl.arange(0, 16, layout=COLS)
    m_i = gl.full([16], -1.0e30, gl.float32, ROWS)
    l_i = gl.zeros([16], gl.float32, ROWS)
    acc = gl.zeros([16, HEAD_DIM], gl.float32, MMA)
    for t0 in range(0, rows, 16):
        t = t0 + offs_kt
        entry = gl.where(t == 0, 0, 1 + (first + t - 1) % tail_capacity)
        k = gl.load(tk_head + gl.expand_dims(entry * stride_tke, 0) + gl.expand_dims(offs_kd, 1),
                    mask=gl.expand_dims(t < rows, 0), other=0.0)
        s = mma_v2(q_lo, k, mma_v2(q_hi, k, gl.zeros([16, 16], gl.float32, MMA)))
        s = s * tail_score_scale + gl.expand_dims(gl.where(t0 + offs_st < rows, 0.0, float("-inf")), 0)
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        t = t0 + offs_vt
        entry = gl.where(t == 0, 0, 1 + (first + t - 1) % tail_capacity)
        v = gl.load(tv_head + gl.expand_dims(entry * stride_tve, 1) + gl.expand_dims(offs_vd, 0),
                    mask=gl.expand_dims(t < rows, 1), other=0.0)
        acc = mma_v2(gl.convert_layout(p.to(gl.float16), A), v.to(gl.float16), acc * gl.expand_dims(alpha, 1))

    seen = l_i > 0.0
    offs_h = gl.arange(0, 16, layout=ROWS)
    head_ok = (offs_h < GROUP) & has_query
    gl.store(lse_ptr + token.to(gl.int64) * stride_lt + (kv_head * GROUP + offs_h) * stride_lh + split,
             gl.where(seen, m_i + gl.log2(gl.where(seen, l_i, 1.0)), float("-inf")), mask=head_ok)
    offs_d = gl.arange(0, HEAD_DIM, layout=COLS)
    gl.store(part_ptr + token.to(gl.int64) * stride_pt + gl.expand_dims((kv_head * GROUP + offs_h) * stride_ph, 1) +
             split * stride_ps + gl.expand_dims(offs_d, 0),
             acc * gl.expand_dims(1.0 / gl.where(seen, l_i, 1.0), 1), mask=gl.expand_dims(head_ok, 1))


@_jit
def _codes_partial(code_program, q_ptr, part_ptr, lse_ptr, kc_ptr, kn_ptr, vc_ptr, vn_ptr, k_int8, k_int8_hi,
                   k_step, v_table, v_table_hi, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, tail_window,
                   tail_capacity, num_kv_heads, score_scale, value_scale, tokens_per_split,
                   stride_qt, stride_qh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_bt,
                   stride_kcb: gl.constexpr, stride_kct: gl.constexpr, stride_kch: gl.constexpr,
                   stride_knb: gl.constexpr, stride_knt: gl.constexpr, stride_knh: gl.constexpr,
                   stride_vcb: gl.constexpr, stride_vct: gl.constexpr, stride_vch: gl.constexpr,
                   stride_vnb: gl.constexpr, stride_vnt: gl.constexpr, stride_vnh: gl.constexpr,
                   GROUP: gl.constexpr, BLOCK_N: gl.constexpr, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr,
                   BITS: gl.constexpr, KA: gl.constexpr, VA: gl.constexpr, HAS_TAIL: gl.constexpr,
                   RESCALE_SLACK: gl.constexpr, UNROLL: gl.constexpr):
    """One program of ``turboquant_decode_gluon`` over the codes: KV head and split from
    ``code_program`` (``kv_head + num_kv_heads * split``)."""
    HALF: gl.constexpr = BLOCK_N // 2
    FW: gl.constexpr = HEAD_DIM // 4  # code bytes per row
    WORDS: gl.constexpr = HEAD_DIM // 16  # code words per row
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    A8: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=4)  # int8 operands
    B8: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=4)
    ROWS: gl.constexpr = gl.SliceLayout(1, MMA)
    KEYS: gl.constexpr = gl.SliceLayout(0, MMA)

    seq = gl.program_id(0)
    kv_head = code_program % num_kv_heads
    split = code_program // num_kv_heads
    seq_len = gl.load(seq_lens_ptr + seq)
    token = gl.load(query_start_loc_ptr + seq)
    has_query = gl.load(query_start_loc_ptr + seq + 1) > token

    # The queries as two int8 parts, ``q = (128 hi + lo) * q_max / (127 * 128)``: one int8 part
    # alone (steps of q_max / 127) moved the scores of sharp heads by a few hundredths. Row m
    # of the operand holds head m's high part, row m + 8 its low part, so one product gives
    # both (a thread holds rows m and m + 8 of the result: no padding rows, no exchange).
    # Columns in the order of the decoded key operands.
    QL: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[4, 8], warps_per_cta=[1, 1],
                                        order=[1, 0])
    offs_qm = gl.arange(0, 16, layout=gl.SliceLayout(1, QL))
    offs_qr = gl.arange(0, 2 * FW, layout=gl.SliceLayout(0, QL))
    q_rows = gl.expand_dims(q_ptr + token.to(gl.int64) * stride_qt + (kv_head * GROUP + offs_qm % 8) * stride_qh, 1)
    q_ok = gl.expand_dims(offs_qm % 8 < GROUP, 1)
    high_rows = gl.expand_dims(offs_qm < 8, 1)
    q0 = _load_query_operand(q_rows, q_ok, offs_qr, 0, FW)
    q1 = _load_query_operand(q_rows, q_ok, offs_qr, 1, FW)
    q_max = gl.maximum(gl.max(gl.abs(q0), 1), gl.max(gl.abs(q1), 1))
    to_int = gl.expand_dims(127.0 / gl.maximum(q_max, 1e-30), 1)
    x0 = q0 * to_int
    x1 = q1 * to_int
    q0 = gl.convert_layout(_query_parts(x0, high_rows), A8)
    q1 = gl.convert_layout(_query_parts(x1, high_rows), A8)
    row_scale = gl.expand_dims(gl.convert_layout(q_max / (127.0 * 128.0) * k_step * score_scale, ROWS), 1)
    row_scale = _group_rows(row_scale + gl.zeros([16, HALF], gl.float32, MMA))
    if BITS == 4:  # half the query's sum in the score product's units, per head (``key_tables``)
        query_sum = _part_sums(x0) + _part_sums(x1)
        half_query_sum = _group_rows(gl.expand_dims(gl.convert_layout(query_sum * 0.5, ROWS), 1) +
                                     gl.zeros([16, HALF], gl.float32, MMA))
    else:
        half_query_sum = row_scale  # unused

    kv_lo = split * tokens_per_split
    kv_hi = gl.minimum(seq_len, kv_lo + tokens_per_split)
    if HAS_TAIL:  # the codes cover positions 1 .. (the ring's first or the query's window start) - 1
        kv_lo = gl.maximum(kv_lo, 1)
        kv_hi = gl.minimum(kv_hi, gl.maximum(seq_len - tail_window, gl.maximum(seq_len - tail_capacity, 1)))
    kv_hi = gl.where(has_query, kv_hi, kv_lo)
    span = gl.maximum(kv_hi - kv_lo, 0).to(gl.uint32)

    # A step reads two runs of HALF keys, each from one page.
    table_ptr = block_tables_ptr + seq.to(gl.int64) * stride_bt
    kc_head = kc_ptr + kv_head.to(gl.int64) * stride_kch
    vc_head = vc_ptr + kv_head.to(gl.int64) * stride_vch
    gl.static_assert(stride_knt == 1 and stride_vnt == 1, "norm words hold two neighbouring tokens")
    kn_head = kn_ptr + kv_head.to(gl.int64) * stride_knh
    vn_head = vn_ptr + kv_head.to(gl.int64) * stride_vnh
    # The key operand is K^T with each code row twice (2 FW rows), once per shift of
    # KEY_ASM; each element loads the whole word holding its byte (the elements of a word
    # share the load): the decoder takes words, and bytes would be unpacked and packed again.
    offs_kn = gl.arange(0, HALF, layout=gl.SliceLayout(0, B8))
    offs_kr = gl.arange(0, 2 * FW, layout=gl.SliceLayout(1, B8))
    if BITS == 4:  # row r reads word r % FW // 4 of half r // FW (its fields h and h + 2)
        k_offsets = gl.expand_dims(offs_kn * stride_kct, 0) + \
            gl.expand_dims(offs_kr % FW // 4 + offs_kr // FW * WORDS, 1)
    else:
        k_offsets = gl.expand_dims(offs_kn * stride_kct, 0) + gl.expand_dims(offs_kr % FW // 4, 1)
    k_shift = gl.expand_dims(2 * (offs_kr // FW), 1) + gl.zeros([2 * FW, HALF], gl.int32, B8)
    # The value operand V^T's row m holds byte m // WORDS of word m % WORDS of each key row:
    # its output row is dimension f * FW + 4 * (m % WORDS) + m // WORDS. A thread's elements
    # pair rows m and m + 8 (the same word) for two neighbouring keys.
    offs_vm = gl.arange(0, FW, layout=gl.SliceLayout(1, A))
    offs_vn = gl.arange(0, HALF, layout=gl.SliceLayout(0, A))  # keys: columns of V^T
    v_offsets = gl.expand_dims(offs_vn * stride_vct, 0) + gl.expand_dims(offs_vm % WORDS, 1)
    byte_lo = (offs_vm // 16 * 16 + offs_vm % 8) // WORDS  # the byte of the pair's first row (m % 16 < 8)
    byte_hi = byte_lo + 8 // WORDS
    v_gather = gl.expand_dims(byte_lo | (4 + byte_lo) << 4 | byte_hi << 8 | (4 + byte_hi) << 12, 1) + \
        gl.zeros([FW, HALF], gl.int32, A)
    v_table_t = gl.full([FW, HALF], v_table, gl.int32, A)
    k_table = gl.full([2 * FW, HALF], k_int8, gl.int32, B8)
    # 3 bits: each main word's top bits sit in extra word ``w % (WORDS / 2)`` after the
    # row's main words, at a bit offset ``e = w // (WORDS / 2)`` on top of the field's
    # (``packing``), which the decoders take in (``KEY_ASM_3``, ``value_asm``).
    k_word = offs_kr % FW // 4
    v_word = offs_vm % WORDS
    k_extra = gl.expand_dims(offs_kn * stride_kct, 0) + gl.expand_dims(WORDS + k_word % (WORDS // 2), 1)
    if BITS == 4:  # the second half's word beside each first-half word
        v_extra = gl.expand_dims(offs_vn * stride_vct, 0) + gl.expand_dims(WORDS + v_word, 1)
    else:
        v_extra = gl.expand_dims(offs_vn * stride_vct, 0) + gl.expand_dims(WORDS + v_word % (WORDS // 2), 1)
    k_rot = gl.expand_dims((2 - 2 * (offs_kr // FW) - k_word // (WORDS // 2)) & 31, 1) + \
        gl.zeros([2 * FW, HALF], gl.int32, B8)
    v_offset = gl.expand_dims(v_word // (WORDS // 2), 1) + gl.zeros([FW, HALF], gl.int32, A)
    # What 3- and 4-bit codes need beside the 2-bit operands (unused at 2 bits): [0] the key
    # extra words' offsets (3 bits), [1] the value extra words' offsets (3 bits: top bits; 4
    # bits: the second half), [2] the key table's second word, [3] the key top bits'
    # rotations (3 bits), [4] the value table's second word, [5] the value top bits' offsets
    # (3 bits), [6] half the query's sum per head (4 bits).
    extra = (k_extra, v_extra, gl.full([2 * FW, HALF], k_int8_hi, gl.int32, B8), k_rot,
             gl.full([FW, HALF], v_table_hi, gl.int32, A), v_offset, half_query_sum)
    # Masks and norms per key in the score rows' own layout (``_norms`` turns the loaded words into it).
    offs_sn = gl.arange(0, HALF, layout=gl.SliceLayout(0, row_scale.type.layout))
    NW: gl.constexpr = gl.BlockedLayout(size_per_thread=[2, 1], threads_per_warp=[8, 4], warps_per_cta=[1, 1],
                                        order=[1, 0])  # norm words: a thread holds the pairs of its score columns
    offs_nw = gl.expand_dims(gl.arange(0, 2, layout=gl.SliceLayout(1, NW)) * (HALF // 4), 1) + \
        gl.expand_dims(gl.arange(0, HALF // 4, layout=gl.SliceLayout(0, NW)), 0)

    acc0 = gl.zeros([FW, 8], gl.float32, MMA)  # O^T of field 0: dimensions x heads
    acc1 = gl.zeros([FW, 8], gl.float32, MMA)
    acc2 = gl.zeros([FW, 8], gl.float32, MMA)
    acc3 = gl.zeros([FW, 8], gl.float32, MMA)
    l_i = row_scale * 0.0  # the softmax denominators' shares (``_step``)
    m_i = gl.sum(l_i, 1) - 1.0e30  # per head of the group, in the score rows' layout
    # Steps start at multiples of BLOCK_N. Only the first and the last step of a split can
    # reach outside kv_lo .. kv_hi - 1: the ones between (full_lo .. full_hi) skip the masks.
    start = kv_lo - kv_lo % BLOCK_N
    full_lo = gl.where(kv_lo % BLOCK_N == 0, start, start + BLOCK_N)
    full_hi = gl.maximum(kv_hi - kv_hi % BLOCK_N, full_lo)
    # Software prefetch: each step loads the next one's codes and norms before it decodes its own.
    codes_a = _load_keys(start, kv_hi, table_ptr, kc_head, vc_head, kn_head, vn_head, k_offsets, v_offsets, offs_nw,
                         extra, stride_kcb, stride_kct, stride_vcb, stride_vct, stride_knb, stride_vnb, PAGE, BITS)
    codes_b = _load_keys(start + HALF, kv_hi, table_ptr, kc_head, vc_head, kn_head, vn_head, k_offsets, v_offsets,
                         offs_nw, extra, stride_kcb, stride_kct, stride_vcb, stride_vct, stride_knb, stride_vnb, PAGE,
                         BITS)
    state = (codes_a, codes_b, m_i, l_i, acc0, acc1, acc2, acc3)
    operands = (table_ptr, kc_head, vc_head, kn_head, vn_head, k_offsets, v_offsets, offs_nw, q0, q1, k_table,
                k_shift, row_scale, offs_sn, v_gather, v_table_t, value_scale, extra)
    if (start < full_lo) & (start < kv_hi):
        state = _step(start, kv_lo, kv_hi, span, state, operands, stride_kcb, stride_kct, stride_vcb, stride_vct,
                      stride_knb, stride_vnb, PAGE, BLOCK_N, KA, VA, MMA, B, True, RESCALE_SLACK, BITS)
    # The unmasked steps UNROLL at a time: a loop of one step copied its prefetched
    # registers into the next iteration's (about 25 moves per step).
    full_mid = full_lo + (full_hi - full_lo) // (UNROLL * BLOCK_N) * (UNROLL * BLOCK_N)
    for start in range(full_lo, full_mid, UNROLL * BLOCK_N):
        for u in gl.static_range(UNROLL):
            state = _step(start + u * BLOCK_N, kv_lo, kv_hi, span, state, operands, stride_kcb, stride_kct,
                          stride_vcb, stride_vct, stride_knb, stride_vnb, PAGE, BLOCK_N, KA, VA, MMA, B, False,
                          RESCALE_SLACK, BITS)
    gl.static_assert(UNROLL == 2, "the unmasked steps left after the loop are at most one")
    if full_mid < full_hi:
        state = _step(full_mid, kv_lo, kv_hi, span, state, operands, stride_kcb, stride_kct, stride_vcb, stride_vct,
                      stride_knb, stride_vnb, PAGE, BLOCK_N, KA, VA, MMA, B, False, RESCALE_SLACK, BITS)
    if full_hi < kv_hi:
        state = _step(full_hi, kv_lo, kv_hi, span, state, operands, stride_kcb, stride_kct, stride_vcb, stride_vct,
                      stride_knb, stride_vnb, PAGE, BLOCK_N, KA, VA, MMA, B, True, RESCALE_SLACK, BITS)
    m_i, l_i, acc0, acc1, acc2, acc3 = state[2:]  # after the codes and norms

    l_i = gl.sum(l_i, 1)
    seen = l_i > 0.0
    lse = gl.convert_layout(gl.where(seen, m_i + gl.log2(gl.where(seen, l_i, 1.0)), float("-inf")), KEYS)
    inv_l = gl.expand_dims(gl.convert_layout(1.0 / gl.where(seen, l_i, 1.0), KEYS), 0)
    offs_oh = gl.arange(0, 8, layout=KEYS)
    head_ok = (offs_oh < GROUP) & has_query
    gl.store(lse_ptr + token.to(gl.int64) * stride_lt + (kv_head * GROUP + offs_oh) * stride_lh + split, lse,
             mask=head_ok)
    offs_om = gl.arange(0, FW, layout=ROWS)
    o_ok = gl.expand_dims(head_ok, 0)
    parts = gl.expand_dims(part_ptr + token.to(gl.int64) * stride_pt + (kv_head * GROUP + offs_oh) * stride_ph +
                           split * stride_ps, 0) + gl.expand_dims(4 * (offs_om % WORDS) + offs_om // WORDS, 1)
    gl.store(parts, acc0 * inv_l, mask=o_ok)
    gl.store(parts + FW, acc1 * inv_l, mask=o_ok)
    gl.store(parts + 2 * FW, acc2 * inv_l, mask=o_ok)
    gl.store(parts + 3 * FW, acc3 * inv_l, mask=o_ok)
