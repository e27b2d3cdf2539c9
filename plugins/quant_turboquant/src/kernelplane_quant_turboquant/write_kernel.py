"""Quantize-on-write in one Triton kernel: K or V rows straight into TurboQuant pages.

The PyTorch path (``codec.encode`` then two scatters) runs a dozen kernels per
plane and layer: subtract the key offset, norm, rotation product, bucketing,
code mapping, norm rescaling, packing, and the scatters. On a GPU that is
most of what a TurboQuant decode step adds over a bfloat16 one. Here one
program takes one (token, KV head): it loads the row, subtracts the offset,
rotates it (a ``dim x dim`` product in column chunks, the matrix stays in
L2), finds each coordinate's cell by counting the thresholds below it (with
the codec's ``scale_search``: the cells of every scaled copy at once, keeping
the best copy's codes), rescales the norm as the codec's ``norm_mode`` asks,
packs the codes in the layout of ``packing`` and stores codes and norm at the
row's slot.

Same arithmetic as the codec, in float32; a coordinate that lies within
rounding of a threshold may land in the neighbouring cell (tests bound how
often).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .packing import main_bits, num_fields

NORM_MODE_IDS = {"mse": 0, "length": 1, "unbiased": 2}
_FP16_MAX = tl.constexpr(65504.0)


@triton.jit
def quantize_write_kernel(
    x_ptr, offset_ptr, rot_ptr, thresholds_ptr, code_of_cell_ptr, table_ptr, scales_ptr, slot_ptr, codes_ptr,
    norms_ptr, tail_ptr, tail_index_ptr,
    stride_xt, stride_xh, stride_rj, stride_rk,
    stride_cb, stride_ct, stride_ch, stride_nb, stride_nt, stride_nh, stride_te, stride_th,
    PAGE: tl.constexpr, DIM: tl.constexpr, BITS: tl.constexpr, FIELDS: tl.constexpr, MAIN_BITS: tl.constexpr,
    KCHUNK: tl.constexpr, HAS_OFFSET: tl.constexpr, NORM_MODE: tl.constexpr, ROTATED: tl.constexpr,
    HAS_TAIL: tl.constexpr, SEARCH: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
):
    """Grid: (tokens, KV heads). ``rot_ptr``: the codec's float32 rotation
    ``R`` (rotated ``y = R x``); ``codes_ptr``/``norms_ptr``: the page tensors
    with strides (block, slot in block, head). ``ROTATED``: the rows are
    already ``R (x - offset)`` in float32 (large writes, see ``launch``).
    ``SEARCH``: the codec's ``scale_search`` (its ``search_scales`` at ``scales_ptr``),
    ``SEARCH_BLOCK`` the power of two holding them.
    ``HAS_TAIL``: also store ``R (x - offset)`` unquantized at entry
    ``tail_index[token]`` of the exact tail (``tail_ptr`` its rows flattened:
    ``[slots * entries, heads, dim]``)."""
    FW: tl.constexpr = DIM // FIELDS
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    block = slot // PAGE
    in_block = slot % PAGE

    offs_f = tl.arange(0, FIELDS)
    offs_i = tl.arange(0, FW)
    coord = offs_f[:, None] * FW + offs_i[None, :]  # [FIELDS, FW]: code j = f * FW + i
    row = x_ptr + token * stride_xt + head * stride_xh

    if ROTATED:
        y = tl.load(row + coord)
        norm = tl.sqrt(tl.sum(tl.sum(y * y, axis=1), axis=0))  # R is orthogonal
    else:
        # y = R x, as [FIELDS, FW], over column chunks of x.
        y = tl.zeros([FIELDS, FW], dtype=tl.float32)
        sq = tl.zeros([KCHUNK], dtype=tl.float32)
        offs_k = tl.arange(0, KCHUNK)
        for k0 in range(0, DIM, KCHUNK):
            x = tl.load(row + k0 + offs_k).to(tl.float32)
            if HAS_OFFSET:
                x -= tl.load(offset_ptr + head * DIM + k0 + offs_k)
            sq += x * x
            r = tl.load(rot_ptr + coord[:, :, None] * stride_rj + (k0 + offs_k)[None, None, :] * stride_rk)
            y += tl.sum(r * x[None, None, :], axis=2)
        norm = tl.sqrt(tl.sum(sq, axis=0))
    if HAS_TAIL:
        entry = tl.load(tail_index_ptr + token)
        tl.store(tail_ptr + entry * stride_te + head * stride_th + coord, y.to(tail_ptr.dtype.element_ty))
    y = y * (tl.sqrt(DIM * 1.0) / tl.maximum(norm, 1e-30))

    # Cell = number of thresholds below y (torch.bucketize); code = code_of_cell[cell].
    if SEARCH == 1:
        cell = tl.zeros([FIELDS, FW], dtype=tl.int32)
        for t in tl.static_range(0, (1 << BITS) - 1):
            cell += (y > tl.load(thresholds_ptr + t)).to(tl.int32)
        code = tl.load(code_of_cell_ptr + cell)
    else:
        # Every scaled copy of y at once ([SEARCH_BLOCK, FIELDS, FW]): one reduction for all,
        # not one per scale (a decode step writes few rows: latency, not work, is its cost).
        offs_s = tl.arange(0, SEARCH_BLOCK)
        scale = tl.load(scales_ptr + offs_s, mask=offs_s < SEARCH, other=1.0)
        scaled = y[None, :, :] * scale[:, None, None]
        cells = tl.zeros([SEARCH_BLOCK, FIELDS, FW], dtype=tl.int32)
        for t in tl.static_range(0, (1 << BITS) - 1):
            cells += (scaled > tl.load(thresholds_ptr + t)).to(tl.int32)
        codes_s = tl.load(code_of_cell_ptr + cells)
        c_s = tl.load(table_ptr + codes_s)
        along_s = tl.maximum(tl.sum(tl.sum(c_s * y[None, :, :], axis=2), axis=1), 0.0)
        square_s = tl.sum(tl.sum(c_s * c_s, axis=2), axis=1)
        score = along_s * along_s / tl.maximum(square_s, 1e-30)  # d cos^2 (codec._search)
        score = tl.where(offs_s < SEARCH, score, -float("inf"))
        best = tl.argmax(score, axis=0)  # the first of equals, as the codec keeps
        code = tl.sum(tl.where(offs_s[:, None, None] == best, codes_s, 0), axis=0)

    if NORM_MODE != 0:
        c = tl.load(table_ptr + code) * (1.0 / tl.sqrt(DIM * 1.0))  # decoded unit-vector coordinates
        if NORM_MODE == 1:
            norm = norm / tl.maximum(tl.sqrt(tl.sum(tl.sum(c * c, axis=1), axis=0)), 1e-30)
        else:
            along = tl.sum(tl.sum(c * y, axis=1), axis=0) * (1.0 / tl.sqrt(DIM * 1.0))
            norm = norm / tl.maximum(along, 1e-6)

    # Main part: byte i holds the low MAIN_BITS bits of code f * FW + i at bit MAIN_BITS * f.
    low = code & ((1 << MAIN_BITS) - 1)
    main = tl.sum(low << (offs_f[:, None] * MAIN_BITS), axis=0)  # disjoint bit fields: sum == or
    page_row = codes_ptr + block * stride_cb + in_block * stride_ct + head * stride_ch
    tl.store(page_row + offs_i, main.to(tl.uint8))
    if BITS == 3:
        # Extra part: top bit of code f * FW + i at byte i % (DIM/8), bit 2f + i // (DIM/8).
        top = tl.reshape(code >> 2, [FIELDS, 2, DIM // 8])
        shift = 2 * tl.arange(0, FIELDS)[:, None, None] + tl.arange(0, 2)[None, :, None]
        extra = tl.sum(tl.sum(top << shift, axis=0), axis=0)
        tl.store(page_row + FW + tl.arange(0, DIM // 8), extra.to(tl.uint8))
    norm_ptr = norms_ptr + block * stride_nb + in_block * stride_nt + head * stride_nh
    tl.store(norm_ptr, tl.minimum(norm, _FP16_MAX).to(tl.float16))


# Above this many multiply-adds (rows x dim x dim) the rotation runs as one
# cuBLAS product before the kernel: each program's own product is fast for the
# few rows of a decode step but 2x slower than the PyTorch path for a
# 1024-token prefill chunk at head dim 128. Measured on an H100
# (bench_turboquant_write.py): in each program wins up to 256 x 3 heads at dim
# 64 (3.1M), cuBLAS from 64 x 8 heads at dim 128 (8.4M) on.
PREROTATE_MIN_WORK = 4 * 2**20


def launch(codec, x, offset, codes, norms, slots, block_size: int, tail=None, tail_index=None) -> None:
    """Quantize ``x [tokens, heads, dim]`` with ``codec`` into ``codes``/``norms``
    (the pages' permuted views) at ``slots``; ``offset [heads, dim]`` or None.
    ``tail [slots, entries, heads, dim]`` and ``tail_index [tokens]``: the
    exact tail's plane and where each row goes in it (``ExactTail.write_index``)."""
    table, thresholds, code_of_cell, rot = codec._on(x.device)
    scales = codec.search_scales_on(x.device)
    tokens, heads, dim = x.shape
    rotated = tokens * heads * dim * dim > PREROTATE_MIN_WORK
    if rotated:
        x = x.float() - offset if offset is not None else x.float()
        x = (x @ rot.T).contiguous()
        offset = None
    elif x.stride(2) != 1:
        x = x.contiguous()
    tail_rows = tail.flatten(0, 1) if tail is not None else norms  # never read without HAS_TAIL
    quantize_write_kernel[(tokens, heads)](
        x, offset if offset is not None else x, rot, thresholds, code_of_cell, table, scales, slots, codes, norms,
        tail_rows, tail_index if tail_index is not None else slots,
        x.stride(0), x.stride(1), rot.stride(0), rot.stride(1),
        codes.stride(0), codes.stride(1), codes.stride(2), norms.stride(0), norms.stride(1), norms.stride(2),
        tail_rows.stride(0), tail_rows.stride(1),
        PAGE=block_size, DIM=dim, BITS=codec.bits, FIELDS=num_fields(codec.bits), MAIN_BITS=main_bits(codec.bits),
        KCHUNK=min(16, dim), HAS_OFFSET=offset is not None, NORM_MODE=NORM_MODE_IDS[codec.norm_mode],
        ROTATED=rotated, HAS_TAIL=tail is not None, SEARCH=codec.scale_search,
        SEARCH_BLOCK=triton.next_power_of_2(codec.scale_search),
        num_warps=4,
    )
