"""Launch plans: tile sizes by shape, and how far to split the KV range.

Plain Python (no Triton import), so it is cheap to import and to test. The
tile tables are keyed on head dim and on whether the batch is decode-like; the
choice is a pure function of the shape, cached, so start-up runs no autotuning.
The numbers come from sweeps on an H100 (see BENCHMARKS.md).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

# Query heads of one KV group that one program may hold; larger groups are
# split across programs (rare: MQA with more than 64 query heads).
MAX_HEADS_PER_PROGRAM = 64

# Flash-decoding: keep every split at least this many keys long, and aim for
# this many programs per SM before splitting stops paying off.
MIN_TOKENS_PER_SPLIT = 256
TARGET_PROGRAMS_PER_SM = 2.0
MAX_SPLITS = 64


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per program (tokens x heads of one group)
    block_n: int  # keys per inner-loop tile
    num_warps: int
    num_stages: int


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def heads_per_program(group: int) -> int:
    """The largest divisor of the GQA group size that one program can hold."""
    return max(d for d in range(1, min(group, MAX_HEADS_PER_PROGRAM) + 1) if group % d == 0)


# Tile candidates, fastest first (H100 sweeps, 32/8 heads, D=128, bf16; see
# BENCHMARKS.md). Later entries need less shared memory: a GPU that cannot fit
# one falls back to the next (``TritonPagedAttention`` remembers which).
_DECODE_TILES = (TileConfig(16, 64, num_warps=2, num_stages=2), TileConfig(16, 32, num_warps=4, num_stages=2))
_PREFILL_TILES = (TileConfig(128, 128, num_warps=8, num_stages=3), TileConfig(128, 64, num_warps=8, num_stages=3),
                  TileConfig(64, 64, num_warps=4, num_stages=2))
_PREFILL_TILES_D256 = (TileConfig(64, 32, num_warps=4, num_stages=2), TileConfig(32, 32, num_warps=4, num_stages=1))


@functools.lru_cache(maxsize=None)
def tile_configs(head_dim: int, heads: int, max_query_len: int) -> tuple[TileConfig, ...]:
    """Tile candidates for one launch, best first. Decode-like batches (a few
    query tokens per sequence) get one small row tile per sequence; prefill
    gets large tiles, each holding at least one whole head group."""
    rows = heads * max_query_len
    if rows <= 64:
        # Decode / speculative verification: memory-bound, stream K/V.
        block_m = max(16, next_pow2(rows))
        # Two warps stream a 16-row tile best; more rows (speculative tokens) want four.
        return tuple(TileConfig(block_m, t.block_n, max(t.num_warps, 4 if block_m > 16 else 1), t.num_stages)
                     for t in _DECODE_TILES)
    table = _PREFILL_TILES if max(16, next_pow2(head_dim)) <= 128 else _PREFILL_TILES_D256
    return tuple(TileConfig(max(t.block_m, next_pow2(heads)), t.block_n, t.num_warps, t.num_stages) for t in table)


def num_kv_splits(programs: int, max_kv_len: int, block_n: int, sm_count: int | None,
                  programs_per_sm: float = TARGET_PROGRAMS_PER_SM) -> tuple[int, int]:
    """(splits, tokens per split) so that ``programs * splits`` fills the GPU.

    ``programs``: programs launched without splitting. Tokens per split are a
    multiple of ``block_n`` so that splits cut between key tiles.
    """
    if max_kv_len <= 0:
        return 1, block_n
    whole = math.ceil(max_kv_len / block_n) * block_n
    if not sm_count:
        return 1, whole
    want = math.ceil(programs_per_sm * sm_count / max(programs, 1))
    splits = max(1, min(want, MAX_SPLITS, max_kv_len // MIN_TOKENS_PER_SPLIT))
    if splits == 1:
        return 1, whole
    per_split = math.ceil(math.ceil(max_kv_len / splits) / block_n) * block_n
    return math.ceil(max_kv_len / per_split), per_split
