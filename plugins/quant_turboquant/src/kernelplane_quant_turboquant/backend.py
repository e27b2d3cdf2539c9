"""The ``AttentionBackend`` over TurboQuant pages: checks inputs, plans, launches.

Every launch parameter is known on the host (shapes, ``max_query_len``,
``max_seq_len``), so ``forward`` never waits on the device.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from kernelplane import AttentionMetadata, AttentionRequest, KVPages
from kernelplane.kv_cache import check_kernel_inputs, exact_tail_in_use

import triton.language as tl

from . import gluon_decode, kernels
from .cubic import decoder_cubic
from .decode_asm import decode_asm
from .packing import num_fields
from .quantizer import TurboQuantKVQuantizer

_LOG2E = 1.4426950408889634
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"

# Decode-like batches (few query rows per KV head) stream the cache; split the
# KV range across programs until about this many programs run per SM, each
# split at least MIN_TOKENS_PER_SPLIT long.
TARGET_PROGRAMS_PER_SM = 2.0
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 128
DECODE_MAX_ROWS = 64  # query rows (tokens x group heads) per program for the decode plan
# The split combine's loads: about this many float32 elements each (64 per thread of its 4 warps).
COMBINE_TILE = 8192
COMBINE_OUT_CHUNK = 64  # output columns per rotation product in the combine
COMBINE_PER_HEAD_SPLITS = 64  # from this many partials per head, each combine program takes one head
# The rotation of the queries before decoding: query rows and output columns per program, and
# the query columns per product (the whole row where the head dim allows: each chunk is a
# round trip to memory, one after another).
ROTATE_ROWS, ROTATE_COLS, ROTATE_CHUNK = 16, 64, 128


@dataclass(frozen=True)
class LaunchPlan:
    block_m: int  # query rows per program (tokens x GQA group)
    block_q: int  # query tokens per program
    block_n: int  # keys per loop step
    splits: int
    tokens_per_split: int
    num_warps: int = 4
    num_stages: int = 2
    lookup: int = 1  # kernels._field: 0 table gather, 1 select tree, 2 PTX prmt lookups (NVIDIA), 3 cubic (2 bits)
    rotated_query: bool = False  # rotate the queries in one product before the kernel, not in every program
    # The exact tail read by a second launch instead of the last split (measured: +13 µs at batch 1,
    # against +3; at 4 bits, 128k tokens, batch 16: +5 % against +10 %; BENCHMARKS.md).
    separate_tail: bool = False
    gluon: bool = False  # decode by gluon_decode (its own block_n and splits; the tail by its own programs)
    max_registers: Optional[int] = None  # the Gluon kernel's register cap per thread (more programs resident per SM)
    combine_heads: int = 0  # query heads per program of the split combine (0: the rule of `_combine_heads`)


def _pow2_divisor(n: int, most: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``most``."""
    return min(n & -n, most)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _split_kv(programs: int, max_kv: int, block_n: int, splits: Optional[int], programs_per_sm: float,
              min_tokens_per_split: int, sm_count: Optional[int]) -> tuple[int, int]:
    """(splits, tokens per split): ``splits`` if given, else enough that ``programs``
    times it reach ``programs_per_sm`` on ``sm_count`` SMs (one split without a count),
    each at least ``min_tokens_per_split`` long. Splits cut between key tiles."""
    if splits is None:
        splits = 1
        if sm_count:
            want = math.ceil(programs_per_sm * sm_count / max(programs, 1))
            splits = max(1, min(want, MAX_SPLITS, max_kv // max(min_tokens_per_split, 1)))
    whole = max(block_n, math.ceil(max_kv / block_n) * block_n)
    per_split = math.ceil(math.ceil(max_kv / max(splits, 1)) / block_n) * block_n if splits > 1 else whole
    return max(1, math.ceil(max_kv / per_split)), per_split


def _whole_rounds_splits(pairs: int, max_kv: int, rounds: int, resident: int) -> int:
    """KV splits for ``pairs`` (sequence, KV head) pairs such that all programs make at most
    ``rounds`` whole rounds of the ``resident`` programs a GPU holds at once, as many as
    fit. Fewer rounds where the splits' limits (``MAX_SPLITS``, ``MIN_TOKENS_PER_SPLIT``)
    cannot make so many; all splits allowed where even one round cannot be filled.
    Against a fixed count per SM, whole rounds leave no SM idle while a last round
    part full drains (H100, batch 4 x 32k: 94 splits 78 µs, 128 splits (2.6 rounds) 86),
    and no more splits than needed keep the combine's partials few."""
    most = max(1, min(MAX_SPLITS, max_kv // MIN_TOKENS_PER_SPLIT))
    rounds = min(rounds, pairs * most // resident)
    return most if rounds < 1 else max(1, min(most, rounds * resident // pairs))


class TurboQuantAttention:
    """Paged MHA/GQA/MQA attention over ``turboquant{2,3,4}`` pages in Triton."""

    # forward has no host syncs: the plan depends only on host-side metadata
    # sizes, and the quantizer's key offset is a buffer read in place.
    supports_cuda_graphs = True
    reads_exact_tail = True  # kernelplane.exact_tail: the kernel reads it beside the codes

    def __init__(self, request: AttentionRequest, sm_count: Optional[int] = None):
        self.request = request
        self.group = request.num_heads // request.num_kv_heads
        self.sm_count = sm_count
        self._operands: dict = {}
        # PTX table lookups where they can run (compiled Triton on NVIDIA, 16-bit queries).
        nvidia = torch.cuda.is_available() and torch.version.cuda is not None and not _INTERPRETED
        self.default_lookup = 2 if nvidia and request.dtype != "float32" else 1
        self.compiled = torch.cuda.is_available() and not _INTERPRETED
        self.gluon_unavailable = self._gluon_unavailable(nvidia)

    def _gluon_unavailable(self, nvidia: bool) -> Optional[str]:
        """Why ``gluon_decode`` cannot serve this request (None: it can, for decode batches)."""
        req = self.request
        if not nvidia:
            return "needs compiled Triton on an NVIDIA GPU"
        if gluon_decode.gluon is None:
            return "this Triton has no Gluon"
        if torch.cuda.get_device_capability()[0] < 8:
            return "needs mma.sync (compute capability 8.0 or newer)"
        if req.dtype == "float32":
            return "decodes to float16: not for float32 queries"
        if req.head_dim not in (64, 128) or req.v_dim != req.head_dim or req.sliding_window is not None or not req.causal:
            return "head dims must be 64 or 128 (both), causal, without a sliding window"
        if self.group > 8:
            return f"at most 8 query heads per KV head, got {self.group}"
        if req.block_size % gluon_decode.PAGE_MULTIPLE:
            return f"pages must hold a multiple of {gluon_decode.PAGE_MULTIPLE} tokens, got {req.block_size}"
        return None

    # ---- planning -------------------------------------------------------
    def plan(self, meta: AttentionMetadata, block_n: Optional[int] = None, programs_per_sm: Optional[float] = None,
             min_tokens_per_split: int = MIN_TOKENS_PER_SPLIT, num_warps: Optional[int] = None,
             num_stages: Optional[int] = None, lookup: Optional[int] = None, splits: Optional[int] = None,
             bits: Optional[int] = None, rotated_query: bool = False, separate_tail: bool = False,
             gluon: Optional[bool] = None, max_registers: Optional[int] = None, rounds: Optional[int] = None) -> LaunchPlan:
        """The launch for this batch; the keyword arguments let tests and benchmarks sweep.
        ``bits``: of the pages (decode batches on an NVIDIA GPU take the Gluon kernel where
        it can run, other 2-bit tiles on a GPU the cubic decoder). ``max_registers``:
        the Gluon kernel's cap (default ``gluon_decode.max_registers(bits)``).
        ``programs_per_sm``: KV splits are added until about this many programs run per SM
        (default ``TARGET_PROGRAMS_PER_SM``; the Gluon kernel's splits make ``rounds`` whole
        rounds of resident programs instead, default ``gluon_decode.ROUNDS``, fewer where a split
        would hold fewer than ``gluon_decode.MIN_KEYS_PER_SPLIT_FOR_ROUNDS`` keys)."""
        max_q = max(1, meta.max_query_len)
        max_kv = meta.max_seq_len if meta.max_seq_len > 0 else int(meta.block_tables.shape[1]) * self.request.block_size
        if gluon is None:
            # The Gluon kernel wins at every decode shape measured on an H100, down to 1 x 8 heads x 4k keys.
            gluon = bits in gluon_decode.KERNEL_ASM and max_q == 1 and self.gluon_unavailable is None
        if gluon:
            return self._gluon_plan(meta, max_q, max_kv, bits, splits, programs_per_sm, max_registers, rounds)
        if max_q * self.group <= DECODE_MAX_ROWS:
            block_q = max_q
            block_m = max(16, next_pow2(max_q * self.group))
        else:
            block_m = max(64, next_pow2(self.group))
            block_q = block_m // self.group
        if lookup is None:
            # The PTX decoder is validated on the GPU for decode tiles; prefill
            # (compute-bound, decode cost amortized over many rows) keeps the
            # portable one (see BENCHMARKS.md). At 2 bits the cubic beats both.
            lookup = self.default_lookup if block_m <= 32 else 1
            if bits == 2 and block_m <= 32 and self.compiled:
                lookup = 3
        if lookup == 3 and bits not in (None, 2):
            raise ValueError(f"lookup 3 (the cubic decoder) is for 2-bit codes, not {bits}")
        if block_n is None:
            block_n = 128 if lookup == 3 else 64
        if num_stages is None:
            num_stages = 3 if lookup == 3 else 2
        programs = meta.num_seqs * math.ceil(max_q / block_q) * self.request.num_kv_heads
        splits, per_split = _split_kv(programs, max_kv, block_n, splits, programs_per_sm or TARGET_PROGRAMS_PER_SM,
                                      min_tokens_per_split,
                                      self.sm_count if max_q * self.group <= DECODE_MAX_ROWS else None)
        if num_warps is None:
            # One Hopper warpgroup (4 warps) per 64 query rows, the row count of a
            # wgmma. With 8 warps on a 64-row tile Triton must split each product
            # over two warpgroups (duplicated rows, or 8-column halves), and Triton
            # 3.6 compiled that to wrong output on an H100 with 16-key tiles (an
            # illegal address at head dim 128). The CPU interpreter has no warps.
            num_warps = 4 if block_m <= 64 else 8
        return LaunchPlan(block_m, block_q, block_n, splits, per_split, num_warps, num_stages, lookup, rotated_query,
                          separate_tail)

    def _gluon_plan(self, meta: AttentionMetadata, max_q: int, max_kv: int, bits: Optional[int],
                    splits: Optional[int], programs_per_sm: Optional[float], max_registers: Optional[int],
                    rounds: Optional[int]) -> LaunchPlan:
        if self.gluon_unavailable:
            raise ValueError(f"the Gluon decode kernel is not available here: {self.gluon_unavailable}")
        if (bits is not None and bits not in gluon_decode.KERNEL_ASM) or max_q != 1:
            *others, last = map(str, gluon_decode.KERNEL_ASM)
            widths = f"{', '.join(others)} or {last}"
            raise ValueError(f"the Gluon decode kernel reads {widths}-bit codes for one query token per sequence, "
                             f"got {bits} bits and up to {max_q} tokens")
        block_n = gluon_decode.BLOCK_N
        max_registers = max_registers or gluon_decode.max_registers(bits or 2)
        pairs = meta.num_seqs * self.request.num_kv_heads
        if splits is None and programs_per_sm is None:
            resident = (self.sm_count or 1) * gluon_decode.resident_per_sm(max_registers)
            fewer_if_short, rounds = rounds is None, rounds or gluon_decode.ROUNDS
            splits = _whole_rounds_splits(pairs, max_kv, rounds, resident)
            while fewer_if_short and rounds > 1 and max_kv < gluon_decode.MIN_KEYS_PER_SPLIT_FOR_ROUNDS * splits:
                rounds -= 1
                splits = _whole_rounds_splits(pairs, max_kv, rounds, resident)
        splits, per_split = _split_kv(pairs, max_kv, block_n, splits, programs_per_sm or 0.0, MIN_TOKENS_PER_SPLIT,
                                      self.sm_count or 1)
        # Queries rotated once before the kernel; the exact tail, if any, is the kernel's last partial.
        return LaunchPlan(16, 1, block_n, splits, per_split, lookup=3, rotated_query=True, gluon=True,
                          max_registers=max_registers)

    # ---- per-quantizer operands -------------------------------------------
    def _tensors_for(self, quantizer: TurboQuantKVQuantizer, device: torch.device) -> dict:
        key = (id(quantizer), str(device))
        if key not in self._operands:
            def hi_lo(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                m = m.to(device=device, dtype=torch.float32).contiguous()
                hi = m.to(torch.bfloat16)
                return hi, (m - hi.float()).to(torch.bfloat16)

            kc, vc = quantizer.key_codec, quantizer.value_codec
            cubics = {}
            if kc.bits == 2:  # the cubic decoder's coefficients, and the unit its values come in
                for p, c in (("k", kc), ("v", vc)):
                    coeffs, unit = decoder_cubic(c.table)
                    cubics[f"{p}_cubic"] = torch.tensor(coeffs, dtype=torch.float32, device=device)
                    cubics[f"{p}_cubic_unit"] = unit
            q_rot = kc.rotation.matrix(dtype=torch.float64).T  # q @ R_k^T
            q_hi, q_lo = hi_lo(q_rot)
            o_hi, o_lo = hi_lo(vc.rotation.matrix(dtype=torch.float64))  # out_rot @ R_v
            self._operands[key] = dict(
                quantizer=quantizer,  # keeps id() valid while cached
                k_table=kc.table.to(device), v_table=vc.table.to(device),
                q_hi=q_hi, q_lo=q_lo, o_hi=o_hi, o_lo=o_lo,
                q_rot=q_rot.to(device=device, dtype=torch.float32).contiguous(),
                bits=kc.bits, k_asm=decode_asm(kc.bits, kc.table), v_asm=decode_asm(vc.bits, vc.table), **cubics,
            )
            if kc.bits in gluon_decode.KERNEL_ASM:  # two words each (the second unused at 2 bits)
                (k_lo, *k_hi), k_step = gluon_decode.key_tables(kc.table, kc.bits)
                v_lo, *v_hi = gluon_decode.value_tables(vc.bits)
                self._operands[key]["gluon_tables"] = (k_lo, k_hi[0] if k_hi else 0, k_step, v_lo,
                                                       v_hi[0] if v_hi else 0)
                self._operands[key]["gluon_value_unit"] = gluon_decode.value_unit(vc.table, vc.bits)
        return self._operands[key]

    # ---- the hot path ---------------------------------------------------
    def forward(self, query: torch.Tensor, pages: KVPages, meta: AttentionMetadata,
                plan: Optional[LaunchPlan] = None) -> torch.Tensor:
        self._check(query, pages, meta)
        req = self.request
        num_tokens = query.shape[0]
        out = torch.empty(num_tokens, req.num_heads, req.v_dim, dtype=query.dtype, device=query.device)
        if num_tokens == 0 or meta.num_seqs == 0:
            return out
        ops = self._tensors_for(pages.quantizer, query.device)
        plan = plan or self.plan(meta, bits=ops["bits"])
        if plan.lookup == 2 and query.dtype == torch.float32:
            raise ValueError("lookup 2 (PTX) decodes to float16: not for float32 queries")
        if plan.lookup == 3 and ops["bits"] != 2 and not plan.gluon:
            raise ValueError(f"lookup 3 (the cubic decoder) is for 2-bit codes, not {ops['bits']}")
        t = pages.tensors
        k_unit = v_unit = 1.0  # the decoded values' unit, for decoders that work in units of their own
        if plan.lookup == 3 and not plan.gluon:
            kc, vc = t["key_codes"], t["value_codes"]  # bytes
            k_table, v_table = ops["k_cubic"], ops["v_cubic"]
            k_unit, v_unit = ops["k_cubic_unit"], ops["v_cubic_unit"]
        else:
            kc, vc = t["key_codes"].view(torch.int32), t["value_codes"].view(torch.int32)  # words; strides in words
            k_table, v_table = ops["k_table"], ops["v_table"]
        kn, vn = t["key_norm"], t["value_norm"]
        has_tail = exact_tail_in_use(pages, meta)
        separate_tail = has_tail and plan.separate_tail and not plan.gluon
        # The tail's partial follows the codes' splits when a launch or programs of its own read it.
        splits = plan.splits + (1 if separate_tail or (has_tail and plan.gluon) else 0)
        partial = torch.empty(num_tokens, req.num_heads, splits, req.v_dim, dtype=torch.float32, device=query.device)
        lse = torch.empty(num_tokens, req.num_heads, splits, dtype=torch.float32, device=query.device)
        rot_chunk = min(32, req.head_dim, req.v_dim)
        q_tiles = math.ceil(max(1, meta.max_query_len) / plan.block_q)
        q_in = self._rotate_queries(query, ops) if plan.rotated_query else query
        score_scale = req.softmax_scale * _LOG2E / math.sqrt(req.head_dim)
        if has_tail:
            tail = pages.exact_tail
            tk, tv, slots, window, capacity = tail.key, tail.value, meta.seq_slots, tail.window, tail.capacity
        else:  # never read: TAIL=0 compiles the tail away
            tk, tv, slots, window, capacity = kn[:1, :1, :1, None], vn[:1, :1, :1, None], meta.seq_lens, 0, 1

        def launch(grid, tail_mode: int) -> None:
            kernels.turboquant_attention_kernel[grid](
                q_in, partial, lse,
                kc, kn, vc, vn, k_table, v_table, ops["q_hi"], ops["q_lo"],
                meta.block_tables, meta.seq_lens, meta.query_start_loc,
                tk, tv, slots, window, capacity, score_scale * math.sqrt(req.head_dim), plan.splits,
                tk.stride(0), tk.stride(1), tk.stride(2), tv.stride(0), tv.stride(1), tv.stride(2),
                req.num_kv_heads, score_scale * k_unit, v_unit / math.sqrt(req.v_dim),
                req.sliding_window or 0, plan.tokens_per_split,
                q_in.stride(0), q_in.stride(1),
                partial.stride(0), partial.stride(1), partial.stride(2),
                lse.stride(0), lse.stride(1),
                meta.block_tables.stride(0),
                kc.stride(0), kc.stride(1), kc.stride(2), kn.stride(0), kn.stride(1), kn.stride(2),
                vc.stride(0), vc.stride(1), vc.stride(2), vn.stride(0), vn.stride(1), vn.stride(2),
                GROUP=self.group, BLOCK_M=plan.block_m, BLOCK_Q=plan.block_q, BLOCK_N=plan.block_n,
                PAGE=pages.block_size, HEAD_DIM=req.head_dim, HEAD_DIM_V=req.v_dim, ROT_CHUNK=rot_chunk,
                BITS=ops["bits"], FIELDS=num_fields(ops["bits"]), LOOKUP=plan.lookup,
                K_ASM=ops["k_asm"] if plan.lookup == 2 else "", V_ASM=ops["v_asm"] if plan.lookup == 2 else "",
                CAUSAL=req.causal, HAS_WINDOW=req.sliding_window is not None,
                COMPUTE_DTYPE=tl.float32 if query.dtype == torch.float32 else tl.float16,
                PRECISION="ieee", UPCAST=_INTERPRETED, ROTATED_QUERY=plan.rotated_query, TAIL=tail_mode,
                num_warps=plan.num_warps, num_stages=plan.num_stages,
            )

        if plan.gluon:
            self._launch_gluon(plan, ops, q_in, partial, lse, pages, meta, score_scale, tk, tv, slots, window, capacity,
                               has_tail)
        else:
            launch((meta.num_seqs, q_tiles, req.num_kv_heads * plan.splits),
                   (1 if separate_tail else 3) if has_tail else 0)
        if separate_tail:
            launch((meta.num_seqs, q_tiles, req.num_kv_heads), 2)
        heads = plan.combine_heads or self._combine_heads(splits)
        if req.num_heads % heads:
            raise ValueError(f"combine_heads must divide the {req.num_heads} query heads, got {heads}")
        column_programs = _combine_column_programs(num_tokens * (req.num_heads // heads), req.v_dim)
        combine_splits(partial, lse, out, ops["o_hi"], ops["o_lo"], splits, heads, column_programs)
        return out

    def _combine_heads(self, splits: int) -> int:
        """Query heads per combine program: the GQA group, or one head where the partials
        are many. A program merges its heads' splits in a chain of loads; at batch 1 x 32k
        (128 splits) one head per program took the combine from 10.1 to 7.4 µs, at batch 16
        x 32k (24 splits) from 9.1 to 11.0 (H100, BENCHMARKS.md)."""
        return 1 if splits >= COMBINE_PER_HEAD_SPLITS else self.group

    def _rotate_queries(self, query: torch.Tensor, ops: dict) -> torch.Tensor:
        """``query @ R_k^T`` in float32 (contiguous), one launch."""
        if query.dtype == torch.float32:  # the kernel splits 16-bit rows into bfloat16 parts
            return torch.matmul(query, ops["q_rot"])
        tokens, heads, dim = query.shape
        out = torch.empty(tokens, heads, dim, dtype=torch.float32, device=query.device)
        rows = tokens * heads
        cols, chunk = _pow2_divisor(dim, ROTATE_COLS), _pow2_divisor(dim, ROTATE_CHUNK)
        kernels.rotate_queries_kernel[(math.ceil(rows / ROTATE_ROWS), dim // cols)](
            query, out, ops["q_hi"], ops["q_lo"], rows, heads, query.stride(0), query.stride(1),
            BLOCK_R=ROTATE_ROWS, DIM=dim, COLS=cols, CHUNK=chunk, UPCAST=_INTERPRETED, num_warps=4)
        return out

    def _launch_gluon(self, plan: LaunchPlan, ops: dict, q_in: torch.Tensor, partial: torch.Tensor, lse: torch.Tensor,
                      pages: KVPages, meta: AttentionMetadata, score_scale: float, tk: torch.Tensor, tv: torch.Tensor,
                      slots: torch.Tensor, window: int, capacity: int, has_tail: bool) -> None:
        """``gluon_decode``: the codes' splits, and the exact tail (if any) as one more."""
        req, t = self.request, pages.tensors
        kc, vc = t["key_codes"].view(torch.int32), t["value_codes"].view(torch.int32)  # words; strides in words
        # Norms as 32-bit words of token pairs ([blocks, tokens / 2, heads]; tokens contiguous).
        kn, vn = (t[name].transpose(1, 2).view(torch.int32).transpose(1, 2) for name in ("key_norm", "value_norm"))
        gluon_decode.turboquant_decode_gluon[(meta.num_seqs, req.num_kv_heads * (plan.splits + (1 if has_tail else 0)))](
            q_in, partial, lse, kc, kn, vc, vn, *ops["gluon_tables"],
            meta.block_tables, meta.seq_lens, meta.query_start_loc, tk, tv, slots, window, capacity,
            req.num_kv_heads, score_scale, score_scale * math.sqrt(req.head_dim),
            ops["gluon_value_unit"] / math.sqrt(req.v_dim), plan.tokens_per_split,
            q_in.stride(0), q_in.stride(1), partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1), meta.block_tables.stride(0),
            tk.stride(0), tk.stride(1), tk.stride(2), tv.stride(0), tv.stride(1), tv.stride(2),
            kc.stride(0), kc.stride(1), kc.stride(2), kn.stride(0), kn.stride(1), kn.stride(2),
            vc.stride(0), vc.stride(1), vc.stride(2), vn.stride(0), vn.stride(1), vn.stride(2),
            GROUP=self.group, BLOCK_N=plan.block_n, PAGE=pages.block_size, HEAD_DIM=req.head_dim,
            BITS=ops["bits"], **gluon_decode.KERNEL_ASM[ops["bits"]], HAS_TAIL=has_tail, num_warps=1,
            **({"maxnreg": plan.max_registers} if plan.max_registers else {}))

    def _check(self, query: torch.Tensor, pages: KVPages, meta: AttentionMetadata) -> None:
        check_kernel_inputs(query, pages, meta, self.request)
        if not isinstance(pages.quantizer, TurboQuantKVQuantizer):
            raise ValueError(f"turboquant attention reads TurboQuant pages only, got format {pages.format!r}")
        for name in ("key_codes", "value_codes"):
            if pages.tensors[name].stride(3) != 1:
                raise ValueError(f"{name} must be contiguous in its last dim")
        if exact_tail_in_use(pages, meta):
            tail = pages.exact_tail
            if tail.key.stride(3) != 1 or tail.value.stride(3) != 1 or tail.key.device != query.device:
                raise ValueError("the exact tail must sit on the query's device, contiguous in its last dim")
            if meta.seq_slots.dtype != torch.int32 or meta.seq_slots.shape[0] != meta.num_seqs:
                raise ValueError(f"seq_slots must be int32 [{meta.num_seqs}], got {meta.seq_slots.dtype} "
                                 f"{tuple(meta.seq_slots.shape)}")


def combine_splits(partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, o_hi: torch.Tensor,
                   o_lo: torch.Tensor, splits: int, heads: int, column_programs: int, num_warps: int = 4) -> None:
    """``kernels.combine_splits_kernel`` over ``partial`` ([tokens, query heads, splits, v_dim])
    into ``out``: ``heads`` query heads per program, ``column_programs`` programs per set of
    heads (each rotating back its share of the columns)."""
    num_tokens, num_heads, _, v_dim = partial.shape
    rows = next_pow2(heads)
    kernels.combine_splits_kernel[(num_tokens, num_heads // heads, column_programs)](
        partial, lse, out, o_hi, o_lo, splits,
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        GROUP=heads, BLOCK_H=rows, BLOCK_S=max(2, next_pow2(splits)),
        SPLIT_CHUNK=max(1, min(next_pow2(splits), COMBINE_TILE // (rows * v_dim))),
        HEAD_DIM_V=v_dim, OUT_CHUNK=min(COMBINE_OUT_CHUNK, v_dim), REPEAT=max(1, 16 // rows),
        OUT_COLS=v_dim // column_programs, UPCAST=_INTERPRETED,
        num_warps=num_warps,
    )


def _combine_column_programs(programs: int, v_dim: int) -> int:
    """Programs sharing one set of heads in the split combine, each rotating back its share
    of the output columns (and merging the partials again): a small batch leaves most SMs
    idle and each program's chain of loads is latency. On an H200 (2026-12-03,
    BENCHMARKS.md) 4 took batch 1 x 32k from 7.4 to 5.5 µs; 2 took batch 4, 8 and 16
    from 7.5 / 7.2 / 6.4 to 7.2 / 5.9 / 5.5 µs (products of 32 columns). Not measured past
    128 programs: one there. At most one per ``COMBINE_OUT_CHUNK`` columns: at head dim 128
    that is 2 since the products take 64 (as fast as 4 of 32 in the whole forward)."""
    wanted = 4 if programs < 64 else 2 if programs <= 128 else 1
    return max(1, min(wanted, v_dim // COMBINE_OUT_CHUNK))
