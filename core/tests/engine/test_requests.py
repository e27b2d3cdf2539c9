"""One request's life: sampling, stop conditions, logprobs, streaming text, aborts and bad input."""
import copy
import dataclasses

import pytest
import torch

from kernelplane.engine import PromptTooLongError, QueueFullError, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


def stream(engine, rid, ids, params):
    """All outputs of one request, stepping the engine until it finishes."""
    engine.add_request(rid, ids, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


# ---- sampling ---------------------------------------------------------------

SAMPLED = dict(temperature=0.9, top_p=0.95, max_tokens=24, ignore_eos=True)


def test_seeded_sampling_is_reproducible_whatever_the_batch(make_engine, tiny_prompts):
    target = tiny_prompts[2]
    alone = make_engine().generate([target], SamplingParams(seed=123, **SAMPLED))[0].token_ids
    engine = make_engine()
    others = [SamplingParams(seed=s, **SAMPLED) for s in (1, 2)] + [SamplingParams(max_tokens=10, **GREEDY)]
    batched = engine.generate([tiny_prompts[0], target, tiny_prompts[1], tiny_prompts[3]],
                              [others[0], SamplingParams(seed=123, **SAMPLED), others[1], others[2]])
    assert batched[1].token_ids == alone
    # Joining mid-flight, with chunked prefill, changes nothing either.
    engine = make_engine(max_num_batched_tokens=8)
    engine.add_request("a", tiny_prompts[3], others[0])
    for _ in range(4):
        engine.step()
    engine.add_request("b", target, SamplingParams(seed=123, **SAMPLED))
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final["b"].token_ids == alone


def test_different_seeds_differ(make_engine, tiny_prompts):
    outs = make_engine().generate([tiny_prompts[1]] * 4, [SamplingParams(seed=s, temperature=1.5, max_tokens=16,
                                                                         ignore_eos=True) for s in range(4)])
    assert len({tuple(o.token_ids) for o in outs}) > 1


def test_top_k_1_equals_greedy(make_engine, tiny_prompts, tiny_reference):
    outs = make_engine().generate(tiny_prompts[:3], SamplingParams(temperature=1.0, top_k=1, max_tokens=32,
                                                                   ignore_eos=True, seed=5))
    assert [o.token_ids for o in outs] == tiny_reference[:3]


def test_tiny_top_p_equals_greedy(make_engine, tiny_prompts, tiny_reference):
    outs = make_engine().generate(tiny_prompts[:2], SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=32,
                                                                   ignore_eos=True))
    assert [o.token_ids for o in outs] == tiny_reference[:2]


def test_first_token_follows_the_tempered_distribution(make_engine, zoo, tiny_prompts):
    # 600 requests sample one token each; the counts must fit softmax(logits / T) (chi-square, p = 0.001).
    ids, temperature, n = tiny_prompts[1], 2.0, 600
    logits = zoo.hf_prefill_logits(zoo.tiny_hf("llama"), ids)[-1]
    p = torch.softmax(logits / temperature, -1).double()
    engine = make_engine(max_num_seqs=64, num_kv_blocks=64 * 6, max_waiting=n)
    outs = engine.generate([ids] * n, [SamplingParams(temperature=temperature, max_tokens=1, seed=i) for i in range(n)])
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=len(p)).double()
    # Pool the tokens too rare to count into one bin.
    common = p * n >= 5
    observed = torch.cat([counts[common], counts[~common].sum()[None]])
    expected = torch.cat([p[common], p[~common].sum()[None]]) * n
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = int(common.sum())  # bins - 1
    critical = {d: c for d, c in [(1, 10.83), (2, 13.82), (3, 16.27), (4, 18.47), (5, 20.52), (6, 22.46), (7, 24.32),
                                  (8, 26.12), (9, 27.88), (10, 29.59), (11, 31.26), (12, 32.91)]}
    assert 2 <= df <= 12, df
    assert stat < critical[df], (stat, df)


# ---- stop conditions ----------------------------------------------------------

def test_max_tokens_finishes_with_length(make_engine, tiny_prompts, tiny_reference):
    out = make_engine().generate([tiny_prompts[1]], SamplingParams(max_tokens=5, **GREEDY))[0]
    assert out.token_ids == tiny_reference[1][:5] and out.finish_reason == "length"


def test_max_model_len_finishes_with_length(make_engine, tiny_prompts, tiny_reference):
    ids = tiny_prompts[1]
    out = make_engine(max_model_len=len(ids) + 7).generate([ids], SamplingParams(max_tokens=100, **GREEDY))[0]
    assert out.token_ids == tiny_reference[1][:7] and out.finish_reason == "length"


def _pick_stop_string(tokenizer, ref):
    """A short ASCII piece of the greedy text, first seen after a few tokens."""
    text = tokenizer.decode(ref)
    for start in range(len(text) // 3, len(text) - 3):
        piece = text[start:start + 3]
        if piece.isascii() and piece.isprintable() and text.find(piece) == start:
            return text, piece
    pytest.skip("no ASCII piece in the reference text")


def test_stop_string_is_trimmed(make_engine, tiny, tiny_prompts, tiny_reference):
    ref = tiny_reference[2]
    text, stop = _pick_stop_string(tiny.tokenizer, ref)
    engine = make_engine()
    outs = stream(engine, "r", tiny_prompts[2], SamplingParams(max_tokens=32, stop=["never appears", stop], **GREEDY))
    final = outs[-1]
    assert final.finish_reason == "stop"
    assert final.text == text[: text.find(stop)]
    # Generation stopped at the token that completed the stop string.
    n = next(i for i in range(1, len(ref) + 1) if stop in tiny.tokenizer.decode(ref[:i]))
    assert final.token_ids == ref[:n]
    # Streamed pieces never show the stop string, and add up to the final text.
    assert "".join(o.delta_text for o in outs) == final.text
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_streamed_text_adds_up(make_engine, tiny, tiny_prompts, tiny_reference):
    outs = stream(make_engine(), "r", tiny_prompts[3], SamplingParams(max_tokens=32, **GREEDY))
    assert "".join(o.delta_text for o in outs) == outs[-1].text == tiny.tokenizer.decode(tiny_reference[3])
    assert sum((o.new_token_ids for o in outs), []) == tiny_reference[3]


def test_stop_token_ids(make_engine, tiny_prompts, tiny_reference):
    ref = tiny_reference[1]
    stop_id = ref[4]
    n = ref.index(stop_id) + 1
    out = make_engine().generate([tiny_prompts[1]], SamplingParams(max_tokens=32, stop_token_ids=[stop_id], **GREEDY))[0]
    assert out.token_ids == ref[:n] and out.finish_reason == "stop"


def _with_eos(tiny, eos_id):
    tokenizer = copy.copy(tiny.tokenizer)
    tokenizer.eos_token_ids = [eos_id]
    return dataclasses.replace(tiny, tokenizer=tokenizer)


def test_eos_stops_unless_ignored(make_engine, tiny, tiny_prompts, tiny_reference):
    ref = tiny_reference[1]
    eos = ref[5]
    n = ref.index(eos) + 1
    engine = make_engine(loaded=_with_eos(tiny, eos))
    stopped = engine.generate([tiny_prompts[1]], SamplingParams(temperature=0, max_tokens=32))[0]
    assert stopped.token_ids == ref[:n] and stopped.finish_reason == "stop"
    ignored = engine.generate([tiny_prompts[1]], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert ignored.token_ids == ref and ignored.finish_reason == "length"


# ---- logprobs -----------------------------------------------------------------

def test_logprobs_match_transformers(make_engine, zoo, tiny_prompts, tiny_reference):
    ids, ref = tiny_prompts[2], tiny_reference[2][:12]
    outs = stream(make_engine(), "r", ids, SamplingParams(max_tokens=12, logprobs=3, **GREEDY))
    entries = sum((o.logprobs for o in outs), [])
    assert [e["token_id"] for e in entries] == ref
    expected = torch.log_softmax(zoo.hf_prefill_logits(zoo.tiny_hf("llama"), ids + ref), -1)[len(ids) - 1: -1]
    for j, e in enumerate(entries):
        assert e["logprob"] == pytest.approx(float(expected[j, ref[j]]), abs=1e-4)
        top_ids, top_lps = zip(*e["top"])
        assert len(top_ids) == 3 and list(top_lps) == sorted(top_lps, reverse=True)
        assert top_ids[0] == ref[j]  # greedy picks the most likely token
        torch.testing.assert_close(torch.tensor(top_lps), expected[j].topk(3).values, atol=1e-4, rtol=0)


def test_offline_generate_returns_every_logprob(make_engine, tiny_prompts, tiny_reference):
    out = make_engine().generate([tiny_prompts[0]], SamplingParams(max_tokens=6, logprobs=0, **GREEDY))[0]
    assert [e["token_id"] for e in out.logprobs] == tiny_reference[0][:6]
    assert all(e["top"] == [] for e in out.logprobs)


def test_no_logprobs_unless_asked(make_engine, tiny_prompts):
    outs = stream(make_engine(), "r", tiny_prompts[0], SamplingParams(max_tokens=4, **GREEDY))
    assert all(o.logprobs is None for o in outs)


# ---- abort and bad input ------------------------------------------------------

def test_abort_frees_every_block(make_engine, tiny_prompts):
    engine = make_engine(max_num_seqs=2, max_num_batched_tokens=16)
    for i, ids in enumerate(tiny_prompts[:4]):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=30, **GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.allocator.num_used > 0 and engine.waiting  # some running, some still waiting
    for i in range(4):
        out = engine.abort_request(f"r{i}")
        assert out.finished and out.finish_reason == "abort"
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert not engine.has_unfinished_requests() and engine.step() == []
    assert engine.abort_request("r0") is None and engine.abort_request("unknown") is None


def test_abort_one_leaves_the_others_untouched(make_engine, tiny_prompts, tiny_reference):
    engine = make_engine()
    for i in range(3):
        engine.add_request(f"r{i}", tiny_prompts[i], SamplingParams(max_tokens=32, **GREEDY))
    final = {}
    for step in range(200):
        if step == 5:
            engine.abort_request("r1")
        final.update({o.request_id: o for o in engine.step() if o.finished})
        if not engine.has_unfinished_requests():
            break
    assert final["r0"].token_ids == tiny_reference[0] and final["r2"].token_ids == tiny_reference[2]
    assert "r1" not in final
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_prompt_too_long(make_engine, tiny_prompts):
    engine = make_engine(max_model_len=20)
    with pytest.raises(PromptTooLongError, match="max_model_len is 20"):
        engine.add_request(None, list(range(3, 23)), SamplingParams())
    engine.add_request(None, list(range(3, 22)), SamplingParams())  # 19 tokens + 1 to generate: fits
    small_cache = make_engine(num_kv_blocks=3, block_size=4)
    with pytest.raises(PromptTooLongError, match="KV cache"):
        small_cache.add_request(None, tiny_prompts[1], SamplingParams())
    assert not small_cache.has_unfinished_requests()


def test_full_queue(make_engine, tiny_prompts):
    engine = make_engine(max_waiting=2)
    engine.add_request("a", tiny_prompts[0], SamplingParams())
    engine.add_request("b", tiny_prompts[0], SamplingParams())
    with pytest.raises(QueueFullError):
        engine.add_request("c", tiny_prompts[0], SamplingParams())
    engine.step()  # both admitted: the queue has room again
    engine.add_request("c", tiny_prompts[0], SamplingParams())


@pytest.mark.parametrize("prompt, message", [([], "empty"), ("", "empty"), ([5, -1], "integers"),
                                             ([5, 10**6], "integers"), ([1.5], "integers")])
def test_bad_prompts(make_engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        make_engine().add_request(None, prompt, SamplingParams())


def test_duplicate_request_id(make_engine, tiny_prompts):
    engine = make_engine()
    engine.add_request("same", tiny_prompts[0], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("same", tiny_prompts[0], SamplingParams())


@pytest.mark.parametrize("params, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=2.5), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(logprobs=-1), "logprobs"), (dict(logprobs=21), "logprobs"), (dict(stop=[""]), "stop"),
    (dict(stop=[3]), "stop"), (dict(max_tokens=True), "max_tokens"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=float("nan")), "top_p"), (dict(top_k=2.0), "top_k"),
    (dict(seed="7"), "seed"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_invalid_sampling_params(make_engine, tiny_prompts, params, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**params).validate()
    engine = make_engine()
    with pytest.raises(ValueError, match=field):
        engine.add_request(None, tiny_prompts[0], SamplingParams(**params))
    assert not engine.has_unfinished_requests()


def test_a_quantized_cache_is_primed_with_real_text_before_any_request(make_engine, tiny_prompts):
    # Quantizers that learn from their first write must see real keys, not a user's prompt
    # or CUDA-graph dummy rows; the priming text is cut to what a small cache holds.
    from kernelplane.engine import SamplingParams

    engine = make_engine(kv_cache_dtype="int8", num_kv_blocks=3)
    assert all(any(t[0].float().abs().sum() > 0 for t in pages.tensors.values()) for pages in engine.kv_caches)
    out = engine.generate([tiny_prompts[0]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 4
