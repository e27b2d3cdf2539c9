"""Launch planning: head grouping, tile choice and KV splits."""
import pytest

from kernelplane_attention_triton.configs import (MAX_SPLITS, MIN_TOKENS_PER_SPLIT, heads_per_program,
                                                  num_kv_splits, tile_configs)


@pytest.mark.parametrize("group, heads", [(1, 1), (3, 3), (8, 8), (64, 64), (96, 48), (128, 64)])
def test_heads_per_program_divides_the_group(group, heads):
    assert heads_per_program(group) == heads


def test_decode_gets_small_row_tiles_and_prefill_large_ones():
    decode = tile_configs(128, 4, 1)[0]
    prefill = tile_configs(128, 4, 4096)[0]
    assert decode.block_m == 16 and prefill.block_m == 128
    assert tile_configs(256, 4, 4096)[0].block_m == 64  # D=256 tiles must fit on chip
    assert tile_configs(128, 64, 4096)[0].block_m >= 64  # a whole head group per tile


def test_fallback_tiles_need_less_shared_memory():
    for candidates in (tile_configs(128, 4, 1), tile_configs(128, 4, 4096), tile_configs(256, 2, 512)):
        smem = [t.num_stages * t.block_n + t.block_m for t in candidates]
        assert smem == sorted(smem, reverse=True) and len(set(candidates)) == len(candidates)


@pytest.mark.parametrize("programs, max_kv", [(8, 16384), (8, 1000), (256, 8192), (1, 300), (512, 100000)])
def test_splits_cover_the_context_in_whole_key_tiles(programs, max_kv):
    splits, per_split = num_kv_splits(programs, max_kv, 64, sm_count=132)
    assert per_split % 64 == 0
    assert splits * per_split >= max_kv > (splits - 1) * per_split  # no empty trailing split
    assert 1 <= splits <= MAX_SPLITS
    assert splits == 1 or per_split >= MIN_TOKENS_PER_SPLIT


def test_small_batch_long_context_is_split_and_a_full_gpu_is_not():
    assert num_kv_splits(8, 16384, 64, 132)[0] >= 16  # B=1, 8 KV heads
    assert num_kv_splits(512, 8192, 64, 132)[0] == 1  # B=64 fills the GPU already
    assert num_kv_splits(8, 16384, 64, None)[0] == 1  # unknown GPU size (interpreter): no split
