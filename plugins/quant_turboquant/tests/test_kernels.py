"""The Triton kernels against the reference on the same TurboQuant pages:
forced KV splits, both centroid lookups, odd GQA groups, several query
tokens per sequence, windows, empty sequences."""
import dataclasses
import math
import os

import pytest
import torch

from kernelplane import AttentionMetadata, AttentionRequest, KVQuantRequest
from kernelplane.exact_tail import ExactTail
from kernelplane.kv_cache import write_kv
from kernelplane.reference.attention import ReferenceAttention
from kernelplane_quant_turboquant import gluon_decode
from kernelplane_quant_turboquant.backend import TurboQuantAttention
from kernelplane_quant_turboquant.quantizer import TurboQuantKVQuantizer

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}
# Interpreted on the CPU; compiled on a GPU under KERNELPLANE_TRITON_COMPILED=1 (see conftest.py).
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"


def run_case(fmt, num_heads, num_kv_heads, head_dim, query_lens, seq_lens, dtype=torch.float32, block_size=16,
             window=None, causal=True, seed=0, tail_window=None, **plan):
    """``tail_window``: the pages get an exact tail (sequences in shuffled slots), written and read."""
    gen = torch.Generator().manual_seed(seed)
    dtype_name = str(dtype).removeprefix("torch.")
    quantizer = TurboQuantKVQuantizer(KVQuantRequest(format=fmt, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                                     dtype=dtype_name, block_size=block_size))
    need = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(need) + 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [order[sum(need[:i]):sum(need[:i + 1])] for i in range(len(need))]
    pages = quantizer.allocate(num_blocks, block_size, num_kv_heads, head_dim, head_dim, DEVICE)
    for t in pages.tensors.values():  # garbage in unwritten slots
        t.copy_(torch.randint(0, 255, t.shape, generator=gen).to(t.dtype))
    slots = None
    if tail_window is not None:
        pages.exact_tail = ExactTail.allocate(tail_window, len(seq_lens) + 1, num_kv_heads, head_dim, head_dim,
                                              dtype, DEVICE)
        slots = torch.randperm(len(seq_lens) + 1, generator=gen)[:len(seq_lens)].tolist()
    written = AttentionMetadata.build(list(seq_lens), list(seq_lens), tables, block_size, DEVICE, seq_slots=slots)
    scale = torch.rand(sum(seq_lens), num_kv_heads, 1, generator=gen) * 3 + 0.1
    key = torch.randn(sum(seq_lens), num_kv_heads, head_dim, generator=gen) * scale
    value = torch.randn(sum(seq_lens), num_kv_heads, head_dim, generator=gen)
    write_kv(pages, key.to(DEVICE), value.to(DEVICE), written.slot_mapping, written)
    meta = AttentionMetadata.build(list(query_lens), list(seq_lens), tables, block_size, DEVICE, seq_slots=slots)
    query = (torch.randn(sum(query_lens), num_heads, head_dim, generator=gen) * 2).to(DEVICE, dtype)
    request = AttentionRequest(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype_name,
                               kv_cache_format=fmt, block_size=block_size, sliding_window=window, causal=causal)
    reference = ReferenceAttention(request).forward(query.float(), pages, meta)
    backend = TurboQuantAttention(request)
    combine_heads = plan.pop("combine_heads", 0)  # a launch detail, not a planning input
    out = backend.forward(query, pages, meta, plan=dataclasses.replace(backend.plan(meta, **plan),
                                                                        combine_heads=combine_heads))
    assert out.dtype == dtype and out.shape == reference.shape
    assert torch.isfinite(out).all()
    err = ((out.double() - reference.double()).norm() / reference.double().norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    if tail_window is not None:  # the tail changed the answer: the comparison above saw it used
        codes_only = AttentionMetadata.build(list(query_lens), list(seq_lens), tables, block_size, DEVICE)
        assert not torch.allclose(ReferenceAttention(request).forward(query.float(), pages, codes_only), reference,
                                  rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("fmt", ["turboquant2", "turboquant3", "turboquant4"])
@pytest.mark.parametrize("lookup", [0, 1])
def test_decode_with_forced_splits(fmt, lookup):
    run_case(fmt, 8, 2, 64, (1, 1, 1), (150, 3, 64), splits=4, block_n=32, lookup=lookup)


def test_decode_with_more_splits_than_one_combine_load():  # the combine reads 32 splits per load at this shape
    run_case("turboquant2", 8, 2, 64, (1, 1), (600, 37), splits=40, block_n=16)


def test_combine_with_one_head_per_program():  # the plan's choice where the partials are many
    run_case("turboquant2", 8, 2, 64, (1, 1), (600, 37), splits=40, block_n=16, combine_heads=1)
    run_case("turboquant3", 9, 3, 64, (1,), (300,), splits=9, block_n=16, combine_heads=1)
    with pytest.raises(ValueError, match="divide"):
        run_case("turboquant3", 9, 3, 64, (1,), (300,), splits=9, block_n=16, combine_heads=2)


def test_decode_gqa_group_of_three_bfloat16():  # SmolLM2-135M: 9 query heads over 3 KV heads
    run_case("turboquant3", 9, 3, 64, (1, 1), (70, 33), dtype=torch.bfloat16, splits=3, block_n=16)


def test_speculative_tokens_with_splits_and_window():
    run_case("turboquant4", 4, 2, 64, (3, 1, 2), (90, 40, 2), window=20, splits=3, block_n=16)


def test_prefill_tiles_across_several_programs():
    # GROUP 4 -> 16 tokens per 64-row tile: several query tiles per sequence.
    run_case("turboquant2", 8, 2, 64, (40, 7), (55, 7), dtype=torch.float16, block_n=16)


def test_plan_runs_one_warpgroup_per_64_rows():
    # 8 warps on a 64-row tile compiled to wrong output on an H100 (the
    # interpreter cannot show it), so the plan itself is checked here.
    request = AttentionRequest(num_heads=8, num_kv_heads=2, head_dim=64, kv_cache_format="turboquant2")
    backend = TurboQuantAttention(request)
    prefill = backend.plan(AttentionMetadata.build([40, 7], [55, 7], [[0, 1, 2, 3], [4]], 16))
    decode = backend.plan(AttentionMetadata.build([16, 1], [55, 7], [[0, 1, 2, 3], [4]], 16))
    assert (prefill.block_m, prefill.num_warps) == (64, 4)
    assert (decode.block_m, decode.num_warps) == (64, 4)


def test_non_causal_and_an_empty_sequence():
    run_case("turboquant3", 4, 4, 64, (2, 0, 5), (9, 0, 20), causal=False, block_size=8)


def test_value_written_per_split_even_when_a_split_is_empty():
    # One short sequence beside a long one: most of its splits see no key.
    run_case("turboquant3", 4, 1, 64, (1, 1), (200, 5), splits=8, block_n=16)


def test_bad_input():
    request = AttentionRequest(num_heads=4, num_kv_heads=2, head_dim=64, kv_cache_format="turboquant3")
    backend = TurboQuantAttention(request)
    meta = AttentionMetadata.build([1], [1], [[0]], 16)
    quantizer = TurboQuantKVQuantizer(KVQuantRequest(format="turboquant3", num_kv_heads=2, head_dim=64))
    pages = quantizer.allocate(1, 16, 2, 64, 64, "cpu")
    with pytest.raises(ValueError, match=r"query must be \[tokens, 4, 64\]"):
        backend.forward(torch.randn(1, 2, 64), pages, meta)
    from kernelplane.kv_cache import allocate_plain_pages
    plain = allocate_plain_pages(1, 16, 2, 64, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="TurboQuant pages only"):
        backend.forward(torch.randn(1, 4, 64), plain, meta)
    bad_meta = AttentionMetadata.build([1], [1], [[0]], 16)
    bad_meta.seq_lens = bad_meta.seq_lens.long()
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        backend.forward(torch.randn(1, 4, 64), pages, bad_meta)
    with pytest.raises(ValueError, match="not for float32 queries"):
        backend.forward(torch.randn(1, 4, 64), pages, meta, plan=backend.plan(meta, lookup=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_with_the_cubic_decoder(dtype):
    # 2 bits, LOOKUP 3: codes read as bytes and decoded by the float16 cubic (exact).
    run_case("turboquant2", 8, 2, 64, (1, 1, 1), (150, 3, 64), dtype=dtype, splits=4, block_n=32, lookup=3)


def test_cubic_decoder_with_drafts_window_and_group_of_three():
    run_case("turboquant2", 9, 3, 64, (3, 1), (90, 40), dtype=torch.bfloat16, window=20, splits=3, block_n=16,
             lookup=3)
    run_case("turboquant2", 4, 1, 128, (1,), (70,), dtype=torch.float16, block_n=64, lookup=3)


@pytest.mark.parametrize("fmt,lookup,dtype", [("turboquant2", 3, torch.bfloat16), ("turboquant3", 1, torch.float16),
                                              ("turboquant4", 0, torch.float32)])
def test_queries_rotated_before_the_kernel(fmt, lookup, dtype):
    # One product for the batch instead of one per program; drafts and a GQA group of three.
    run_case(fmt, 9, 3, 64, (1, 2), (150, 40), dtype=dtype, splits=3, block_n=32, lookup=lookup, rotated_query=True)


def test_plan_takes_the_cubic_for_two_bits_on_a_gpu_only():
    request = AttentionRequest(num_heads=8, num_kv_heads=2, head_dim=64, kv_cache_format="turboquant2")
    backend = TurboQuantAttention(request)
    backend.gluon_unavailable = "as on a GPU without Gluon: the Triton kernel decodes"
    decode = AttentionMetadata.build([1, 1], [55, 7], [[0, 1, 2, 3], [4]], 16)
    prefill = AttentionMetadata.build([40, 7], [55, 7], [[0, 1, 2, 3], [4]], 16)
    backend.compiled = False  # the interpreter: the select tree stays the default
    assert backend.plan(decode, bits=2).lookup != 3
    backend.compiled = True
    plan = backend.plan(decode, bits=2)
    assert (plan.lookup, plan.block_n, plan.num_stages) == (3, 128, 3)
    assert backend.plan(decode, bits=3).lookup != 3
    assert backend.plan(prefill, bits=2).lookup != 3
    with pytest.raises(ValueError, match="for 2-bit codes"):
        backend.plan(decode, bits=4, lookup=3)


@pytest.mark.parametrize("fmt,lookup,dtype", [("turboquant2", 3, torch.bfloat16), ("turboquant3", 1, torch.float16),
                                              ("turboquant4", 0, torch.float32)])
def test_exact_tail_read_beside_the_codes(fmt, lookup, dtype):
    # Decode and drafts over split KV ranges (the tail read by the last split), sequences shorter than the tail
    # (codes cover nothing), a GQA group of three.
    run_case(fmt, 9, 3, 64, (1, 3, 1), (150, 40, 5), dtype=dtype, splits=3, block_n=32, lookup=lookup,
             tail_window=20)


def test_exact_tail_read_by_a_second_launch():
    run_case("turboquant4", 9, 3, 64, (1, 3, 1), (150, 40, 5), dtype=torch.float16, splits=3, block_n=32,
             tail_window=20, separate_tail=True)


def test_exact_tail_in_prefill_tiles_with_a_window():
    run_case("turboquant4", 8, 2, 64, (40, 7), (55, 7), dtype=torch.float16, block_n=16, window=30, tail_window=12)
    run_case("turboquant3", 4, 1, 128, (1,), (70,), dtype=torch.bfloat16, block_n=64, tail_window=64)


def test_plan_takes_the_gluon_kernel_for_decode_batches():
    request = AttentionRequest(num_heads=32, num_kv_heads=8, head_dim=128, kv_cache_format="turboquant2",
                               dtype="bfloat16")
    backend = TurboQuantAttention(request, sm_count=132)
    big = AttentionMetadata.build([1] * 16, [4096] * 16, [list(range(256 * i, 256 * (i + 1))) for i in range(16)], 16)
    small = AttentionMetadata.build([1] * 4, [4096] * 4, [list(range(256 * i, 256 * (i + 1))) for i in range(4)], 16)
    drafts = AttentionMetadata.build([3] * 16, [4096] * 16, [list(range(256 * i, 256 * (i + 1))) for i in range(16)],
                                     16)
    unavailable_here = backend.gluon_unavailable
    if unavailable_here:  # e.g. this CPU: never planned, and asking for it names the reason
        assert not backend.plan(big, bits=2).gluon
        with pytest.raises(ValueError, match="not available here"):
            backend.plan(big, bits=2, gluon=True)
    backend.gluon_unavailable = None  # as on an H100
    plan = backend.plan(big, bits=2)
    assert plan.gluon and plan.block_n == 32 and plan.splits * plan.tokens_per_split >= 4096
    assert plan.max_registers == 168 and backend.plan(big, bits=2, max_registers=200).max_registers == 200
    # Splits fill whole rounds of the programs an H100 holds at once (132 SMs x 12 at 168 registers):
    # two where each split keeps at least MIN_KEYS_PER_SPLIT_FOR_ROUNDS keys, else one.
    resident = 132 * 12
    for batch, context, rounds, asked in ((16, 131072, 2, None), (8, 131072, 2, None), (16, 32768, 1, None),
                                          (4, 32768, 1, None), (16, 4096, 1, None), (16, 32768, 2, 2)):
        meta = AttentionMetadata.build([1] * batch, [context] * batch, [list(range(context // 16))] * batch, 16)
        plan = backend.plan(meta, bits=2, rounds=asked)
        programs = batch * 8 * plan.splits
        assert 0.9 * rounds * resident < programs <= rounds * resident, (batch, context, plan.splits)
        assert plan.splits * plan.tokens_per_split >= context
        if rounds == 2 and asked is None:
            assert plan.tokens_per_split >= gluon_decode.MIN_KEYS_PER_SPLIT_FOR_ROUNDS
    one_long = AttentionMetadata.build([1], [32768], [list(range(2048))], 16)
    assert backend.plan(one_long, bits=2).splits == 128  # under one round: as many splits as allowed
    assert backend.plan(small, bits=2).gluon
    assert backend.plan(one_long, bits=2).gluon
    assert backend.plan(big, bits=3).gluon and backend.plan(big, bits=4).gluon
    assert backend.plan(big, bits=3).max_registers == 255
    assert not backend.plan(drafts, bits=2).gluon
    with pytest.raises(ValueError, match="reads 2, 3 or 4-bit codes"):
        backend.plan(big, bits=1, gluon=True)
    with pytest.raises(ValueError, match="one query token per sequence"):
        backend.plan(drafts, bits=2, gluon=True)
    if not unavailable_here:  # pages of 8 tokens (a read of 16 keys would span two); 16 query heads per KV head
        odd_pages = TurboQuantAttention(request.model_copy(update={"block_size": 8}), sm_count=132)
        assert "multiple of 16" in odd_pages.gluon_unavailable
        wide_group = TurboQuantAttention(request.model_copy(update={"num_heads": 128}), sm_count=132)
        assert "at most 8" in wide_group.gluon_unavailable


@pytest.mark.skipif(DEVICE == "cpu", reason="Gluon kernels do not run in Triton's CPU interpreter (compiled for "
                                           "sm_90 in test_compiles_for_sm90.py)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["turboquant2", "turboquant3", "turboquant4"])
def test_gluon_decode_kernel(fmt, dtype):
    run_case(fmt, 32, 8, 128, (1, 1, 1), (1500, 3, 64), dtype=dtype, gluon=True, splits=4)
    # A GQA group of three at head dim 64 (SmolLM2) and GQA 4 at 128, the exact tail read by the kernel's own
    # programs: sequences longer than the ring, shorter than the window, and of one token.
    run_case(fmt, 9, 3, 64, (1, 1, 1), (150, 40, 5), dtype=dtype, gluon=True, splits=3, tail_window=20)
    run_case(fmt, 32, 8, 128, (1, 1, 1), (700, 70, 1), dtype=dtype, gluon=True, splits=2, tail_window=64)
    # Pages of 32 tokens (two steps per page), GQA 5, sequences ending mid-step.
    run_case(fmt, 10, 2, 128, (1, 1), (333, 47), dtype=dtype, block_size=32, gluon=True, splits=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim, tiles", [(64, None), (128, None), (256, None), (96, None), (128, (32, 32, 32)),
                                        (64, (16, 32, 64))])
def test_rotate_queries_kernel_matches_the_float32_product(dtype, dim, tiles, monkeypatch):
    """The decode plans' one-launch query rotation, on strided rows (a slice of a fused QKV),
    at the backend's tile shapes and others (a head dim whose rows are not a power of two
    takes chunks of 32)."""
    from kernelplane_quant_turboquant import backend as backend_module

    if tiles is not None:
        for name, value in zip(("ROTATE_ROWS", "ROTATE_COLS", "ROTATE_CHUNK"), tiles):
            monkeypatch.setattr(backend_module, name, value)
    request = AttentionRequest(num_heads=9, num_kv_heads=3, head_dim=dim, kv_cache_format="turboquant2",
                               dtype=str(dtype).removeprefix("torch."))
    quantizer = TurboQuantKVQuantizer(KVQuantRequest(format="turboquant2", num_kv_heads=3, head_dim=dim,
                                                     dtype=request.dtype))
    backend = TurboQuantAttention(request)
    ops = backend._tensors_for(quantizer, torch.device(DEVICE))
    gen = torch.Generator().manual_seed(3)
    qkv = (torch.randn(37, 15, dim, generator=gen) * 3).to(DEVICE, dtype)
    query = qkv[:, 2:11]  # 9 heads out of 15: rows are not contiguous
    out = backend._rotate_queries(query, ops)
    want = torch.matmul(query.double(), ops["q_rot"].double())
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == query.shape
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-5
