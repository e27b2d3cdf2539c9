"""The Triton kernels against the core's reference, on fresh random paged caches.

Every case runs twice: with the plan the backend picks, and with a forced
plan of tiny tiles and many KV splits, so that small shapes still cross many
query tiles, key tiles and splits (the tile search and the combine kernel).
"""
import zlib

import pytest
import torch

from kernelplane.reference.attention import ReferenceAttention
from kernelplane import AttentionRequest, probe_hardware
from kernelplane.testing.attention import AttentionCase, make_inputs
from kernelplane_attention_triton.backend import LaunchPlan, TritonPagedAttention
from kernelplane_attention_triton.configs import TileConfig

# ||out - ref|| / ||ref||: float32 runs exact dots here; 16-bit outputs carry
# their rounding (and bf16 its 8-bit mantissa in the P @ V operand).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

DEVICE = probe_hardware().torch_device if probe_hardware().is_gpu else "cpu"

C = AttentionCase
CASES = [
    # decode: ragged lengths, single-token sequence, lengths on and across page edges
    C("decode_mha_ragged", 4, 4, 64, (1, 1, 1, 1), (1, 16, 17, 100)),
    C("decode_gqa2_d128", 8, 4, 128, (1, 1, 1), (33, 64, 65)),
    C("decode_gqa4", 8, 2, 64, (1, 1), (200, 7)),
    C("decode_gqa8_d128", 16, 2, 128, (1, 1, 1), (129, 31, 1)),
    C("decode_group3", 9, 3, 64, (1, 1), (50, 20)),
    C("decode_d256", 4, 2, 256, (1, 1), (40, 3)),
    C("decode_page32", 4, 1, 64, (1, 1), (70, 33), block_size=32),
    C("decode_page128", 8, 2, 64, (1, 1), (300, 128), block_size=128),
    C("decode_page256", 8, 2, 64, (1, 1), (300, 256), block_size=256),
    C("decode_window", 8, 2, 64, (1, 1, 1), (60, 5, 33), sliding_window=16),
    # prefill, chunked prefill, multi-token decode, mixed batches
    C("prefill_gqa4", 8, 2, 64, (37, 1, 20), (37, 1, 20)),
    C("prefill_page256", 4, 2, 64, (40,), (40,), block_size=256),
    C("chunked_prefill_gqa8_d128", 16, 2, 128, (9, 33), (70, 40)),
    C("multi_token_decode", 4, 2, 64, (3, 5, 2), (40, 18, 2)),
    C("mixed_batch", 8, 2, 128, (1, 24, 4, 1), (90, 24, 20, 1)),
    C("prefill_d256", 4, 2, 256, (9, 1), (40, 9)),
    C("prefill_window", 4, 2, 64, (30, 12), (30, 50), sliding_window=8),
    C("window_of_one", 4, 4, 64, (6, 1), (6, 19), sliding_window=1),
    C("non_causal", 4, 2, 64, (7, 1), (20, 9), causal=False),
    C("head_dim_96", 4, 2, 96, (1, 6), (30, 6)),
    C("value_dim_64", 4, 2, 128, (1, 6), (21, 6), head_dim_v=64),
    C("value_dim_256", 4, 4, 64, (1, 3), (17, 3), head_dim_v=256),
]


def tiny_plan(backend: TritonPagedAttention, max_seq_len: int) -> LaunchPlan:
    """16-row tiles, 16-key tiles and splits of 32 keys."""
    block_m = max(16, 1 << (backend.heads - 1).bit_length())
    splits = max(1, -(-max_seq_len // 32))
    return LaunchPlan(TileConfig(block_m, 16, num_warps=4, num_stages=1), backend.heads, splits, 32)


def run_case(case, dtype, seed=0, tiny=False, kv_cache_format="auto"):
    request, pages, meta, query = make_inputs(case, dtype, kv_cache_format, seed=seed, device=DEVICE)
    backend = TritonPagedAttention(request)
    plan = tiny_plan(backend, meta.max_seq_len) if tiny else None
    out = backend.forward(query, pages, meta, plan=plan)
    ref = ReferenceAttention(request).forward(query.float(), pages, meta)
    return out, ref


def check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("tiny", [False, True], ids=["auto_plan", "tiny_tiles_split"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_bf16(case, tiny):
    out, ref = run_case(case, "bfloat16", seed=zlib.crc32(case.name.encode()), tiny=tiny)
    check(out, ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("tiny", [False, True], ids=["auto_plan", "tiny_tiles_split"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in
                                  ("decode_gqa8_d128", "mixed_batch", "prefill_window", "value_dim_64")], ids=str)
def test_matches_reference_other_dtypes(case, tiny, dtype):
    out, ref = run_case(case, dtype, seed=7, tiny=tiny)
    check(out, ref, getattr(torch, dtype))


def test_float32_cache_with_bf16_queries():
    out, ref = run_case(CASES[1], "bfloat16", kv_cache_format="float32", tiny=True)
    check(out, ref, torch.bfloat16)


def test_split_plan_is_used_for_long_contexts_on_a_big_gpu():
    request, pages, meta, query = make_inputs(C("one_long", 8, 2, 64, (1,), (2000,)), "float16", device=DEVICE)
    backend = TritonPagedAttention(request, sm_count=132)
    plan = backend.plan(query.shape[0], meta, pages.block_size)
    assert plan.splits > 1 and plan.splits * plan.tokens_per_split >= 2000
    check(backend.forward(query, pages, meta), ReferenceAttention(request).forward(query.float(), pages, meta),
          torch.float16)


def test_last_split_reaches_the_end_of_the_sequence():
    # A plan whose splits cover less than the context must still see every key.
    request, pages, meta, query = make_inputs(CASES[2], "float32", device=DEVICE)  # lengths 200 and 7
    backend = TritonPagedAttention(request)
    plan = LaunchPlan(TileConfig(16, 16, num_warps=4, num_stages=1), backend.heads, 3, 32)
    check(backend.forward(query, pages, meta, plan=plan),
          ReferenceAttention(request).forward(query.float(), pages, meta), torch.float32)


def test_fresh_inputs_give_fresh_outputs():
    # Guards against a cached or constant result: two seeds, two answers, both right.
    outs = []
    for seed in (1, 2):
        out, ref = run_case(CASES[2], "float32", seed=seed)
        check(out, ref, torch.float32)
        outs.append(out)
    assert not torch.allclose(outs[0], outs[1])


def test_empty_batch():
    request, pages, meta, query = make_inputs(CASES[0], "float16", device=DEVICE)
    out = TritonPagedAttention(request).forward(query[:0], pages, meta)
    assert out.shape == (0, 4, 64)


def test_bad_inputs_are_named():
    request, pages, meta, query = make_inputs(CASES[1], "bfloat16", device=DEVICE)
    backend = TritonPagedAttention(request)
    with pytest.raises(ValueError, match="query must be"):
        backend.forward(query[:, :4], pages, meta)
    meta.seq_lens = meta.seq_lens.long()
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        backend.forward(query, pages, meta)


def test_warmup_runs_every_kernel_variant():
    request = AttentionRequest(num_heads=8, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_size=16)
    TritonPagedAttention(request).warmup(even_interpreted=True)


def test_tiles_too_big_for_the_gpu_fall_back_to_the_next_candidate(monkeypatch):
    class OutOfResources(Exception):  # what Triton raises when shared memory runs out
        pass

    request, pages, meta, query = make_inputs(CASES[11], "float16", device=DEVICE)  # a prefill case
    backend = TritonPagedAttention(request)
    first = backend.plan(query.shape[0], meta, pages.block_size).tiles
    launch = backend._launch

    def small_gpu_launch(plan, *args):
        if plan.tiles == first:
            raise OutOfResources("out of resource: shared memory")
        return launch(plan, *args)

    monkeypatch.setattr(backend, "_launch", small_gpu_launch)
    out = backend.forward(query, pages, meta)
    check(out, ReferenceAttention(request).forward(query.float(), pages, meta), torch.float16)
    assert backend.unfit_tiles == {first}
    assert backend.plan(query.shape[0], meta, pages.block_size).tiles != first
