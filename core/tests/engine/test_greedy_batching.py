"""Greedy decoding equals transformers, whatever the batching does.

Continuous batching, chunked prefill, preemption and the KV block size all
change how the work is cut up, never which tokens come out.
"""
import pytest

from kernelplane.engine import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def run_to_completion(engine, joins=None):
    """Step until idle; ``joins`` maps a step number to (request id, prompt ids) added before that step."""
    joins = dict(joins or {})
    final, step = {}, 0
    while engine.has_unfinished_requests() or joins:
        for rid, ids in joins.pop(step, []):
            engine.add_request(rid, ids, GREEDY)
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
        assert step < 10_000
    return final


def test_all_at_once_matches_transformers(make_engine, tiny_prompts, tiny_reference):
    engine = make_engine()
    outputs = engine.generate(tiny_prompts, GREEDY)
    for out, ref in zip(outputs, tiny_reference):
        assert out.token_ids == ref
        assert out.finish_reason == "length"
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_one_sequence_at_a_time_matches_transformers(make_engine, tiny_prompts, tiny_reference):
    engine = make_engine(max_num_seqs=1)
    outputs = engine.generate(tiny_prompts[:3], GREEDY)
    assert [o.token_ids for o in outputs] == tiny_reference[:3]


def test_requests_joining_mid_flight_change_nobody(make_engine, tiny_prompts, tiny_reference):
    engine = make_engine()
    joins = {0: [("r0", tiny_prompts[0])], 3: [("r1", tiny_prompts[1]), ("r2", tiny_prompts[2])],
             7: [("r3", tiny_prompts[3])], 20: [("r4", tiny_prompts[4])]}
    final = run_to_completion(engine, joins)
    for i, ref in enumerate(tiny_reference):
        assert final[f"r{i}"].token_ids == ref, f"r{i}"


@pytest.mark.parametrize("budget", [2, 8])
def test_chunked_prefill_gives_the_same_tokens(make_engine, tiny_prompts, tiny_reference, budget):
    engine = make_engine(max_num_batched_tokens=budget)
    joins = {0: [("r0", tiny_prompts[2])], 2: [("r1", tiny_prompts[1])], 5: [("r2", tiny_prompts[0])]}
    final = run_to_completion(engine, joins)
    for rid, i in (("r0", 2), ("r1", 1), ("r2", 0)):
        assert final[rid].token_ids == tiny_reference[i], rid


def test_preemption_gives_the_same_tokens(make_engine, tiny_prompts, tiny_reference):
    # 4-token blocks; the longest request alone needs 24 of the 26 blocks, so others get preempted.
    engine = make_engine(num_kv_blocks=26, block_size=4)
    outputs = engine.generate(tiny_prompts, GREEDY)
    assert engine.counters["preemptions"] > 0
    for out, ref in zip(outputs, tiny_reference):
        assert out.token_ids == ref
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_preemption_with_chunked_prefill(make_engine, tiny_prompts, tiny_reference):
    # 4-token blocks: the two long requests need 23 + 26 blocks of the 30.
    engine = make_engine(num_kv_blocks=30, block_size=4, max_num_batched_tokens=16)
    outputs = engine.generate(tiny_prompts[1:4], GREEDY)
    assert engine.counters["preemptions"] > 0
    assert [o.token_ids for o in outputs] == tiny_reference[1:4]


@pytest.mark.parametrize("block_size", [1, 3, 16, 64])
def test_block_size_does_not_matter(make_engine, tiny_prompts, tiny_reference, block_size):
    outputs = make_engine(block_size=block_size).generate(tiny_prompts, GREEDY)
    assert [o.token_ids for o in outputs] == tiny_reference


def test_request_larger_than_the_cache_stops_with_length(make_engine, tiny_prompts, tiny_reference):
    # 6 blocks of 4 tokens: the prompt fits, its continuation cannot. The engine stops it and
    # reports it finished (it used to drop it silently, leaving generate() and streams waiting).
    engine = make_engine(num_kv_blocks=6, block_size=4)
    out = engine.generate([tiny_prompts[1]], GREEDY)[0]
    assert out.finished and out.finish_reason == "length"
    # Every cached token's KV fits; the last sampled token needs no slot yet.
    assert len(tiny_prompts[1]) + len(out.token_ids) == 6 * 4 + 1
    assert out.token_ids == tiny_reference[1][: len(out.token_ids)]
    assert engine.allocator.num_free == 6 and not engine.has_unfinished_requests()


def test_smollm2_greedy_matches_transformers(zoo):
    from kernelplane.engine import EngineConfig, LLMEngine

    loaded = zoo.smollm2_kp()
    hf = zoo.smollm2_hf()
    # The prompts of models/test_paged_generation.py: transformers' continuations are computed once.
    chats = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
    prompts = [loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template([{"role": "user", "content": c}]))
               for c in chats]
    prompts[2] = prompts[2][:-5]
    engine = LLMEngine(EngineConfig(max_num_seqs=4), loaded=loaded)  # default backend selection
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for out, ids in zip(engine.generate(prompts, params), prompts):
        assert out.token_ids == zoo.hf_greedy(hf, ids, 16)


@pytest.mark.parametrize("block_size", [4, 16])
def test_unwritten_cache_slots_are_never_read(make_engine, tiny_prompts, tiny_reference, block_size):
    # The cache is allocated uninitialized: slots past a sequence's end may hold NaN.
    # Attention must mask them out entirely (0 * NaN is NaN), whatever they hold.
    engine = make_engine(block_size=block_size)
    for pages in engine.kv_caches:
        for t in pages.tensors.values():
            t.fill_(float("nan"))
    outputs = engine.generate(tiny_prompts, GREEDY)
    assert [o.token_ids for o in outputs] == tiny_reference


def test_an_exact_tail_as_long_as_the_context_makes_an_int8_cache_exact(make_engine, tiny_prompts, tiny_reference):
    """Every position read from the tail: greedy tokens equal transformers' on the float weights, through slot
    reuse (more prompts than slots) and preemption (a cache too small for all of them)."""
    engine = make_engine(kv_cache_dtype="int8", kv_exact_tail=256, max_num_seqs=3, num_kv_blocks=40)
    assert engine.exact_tail == 256 and engine.kv_caches[0].exact_tail is not None
    outputs = engine.generate(tiny_prompts, GREEDY)
    assert [o.token_ids for o in outputs] == tiny_reference
    assert engine.counters["preemptions"] > 0
    assert sorted(engine.free_seq_slots) == [0, 1, 2]


def test_int8_without_the_tail_is_not_exact(make_engine, tiny_prompts, tiny_reference):
    """The test above can fail: the same cache with the tail off reads int8 everywhere."""
    engine = make_engine(kv_cache_dtype="int8", kv_exact_tail=0, max_num_seqs=3)
    assert engine.kv_caches[0].exact_tail is None
    outputs = engine.generate(tiny_prompts, GREEDY)
    assert [o.token_ids for o in outputs] != tiny_reference
