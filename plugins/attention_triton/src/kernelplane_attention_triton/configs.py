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


@functools.lru_cache(maxsize=None)
def tile_config(head_dim: int, heads: int, max_query_len: int, block_size: int) -> TileConfig:
    """Tiles for one launch. Decode-like batches (a few query tokens per
    sequence) get one small row tile per sequence; prefill gets large tiles."""
    block_d = max(16, next_pow2(head_dim))
    rows = heads * max_query_len
    if rows <= 64:
        # Decode / speculative verification: memory-bound, stream K/V.
        block_m = max(16, next_pow2(rows))
        block_n = 64 if block_d <= 128 else 32
        return TileConfig(block_m, block_n, num_warps=4, num_stages=3)
    # Prefill: compute-bound; big tiles, and at least one full head group per tile.
    block_m = max(128 if block_d <= 128 else 64, next_pow2(heads))
    block_n = 64 if block_d <= 128 else 32
    return TileConfig(block_m, block_n, num_warps=8 if block_m >= 128 else 4, num_stages=3 if block_d <= 128 else 2)


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
