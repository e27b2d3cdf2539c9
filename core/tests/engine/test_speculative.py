"""Speculative decoding in the engine: drafts from test proposers, verified exactly.

The proposers are plugins registered in-process: an oracle that replays the
reference greedy continuation (everything accepted), a random one (almost
nothing accepted), and misbehaving ones. Whatever they propose, greedy
output must equal plain greedy decoding.
"""
import random

import pytest

from kernelplane import Capability, Provider, Requirements, hookimpl
from kernelplane.engine import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


class ScriptedProposer:
    """Follows each request's tokens and proposes from a script.

    ``mode``: "oracle" proposes the next tokens of the reference continuation,
    "random" random ids, "invalid" ids outside the vocabulary after one good
    token, "greedy-overrun" the reference but ignoring the length limit.
    """

    def __init__(self, references: dict[tuple, list[int]], mode: str, vocab: int):
        self.references, self.mode, self.vocab = references, mode, vocab
        self.tokens: dict[str, list[int]] = {}
        self.prompt_len: dict[str, int] = {}
        self.limits_seen: list[int] = []
        self.rng = random.Random(0)
        self.removed: list[str] = []

    def add_request(self, request_id, prompt_token_ids):
        self.tokens[request_id] = list(prompt_token_ids)
        self.prompt_len[request_id] = len(prompt_token_ids)

    def extend(self, request_id, token_ids):
        self.tokens[request_id] += list(token_ids)

    def remove_request(self, request_id):
        self.tokens.pop(request_id)
        self.removed.append(request_id)

    def _continuation(self, request_id):
        seq, n = self.tokens[request_id], self.prompt_len[request_id]
        ref = self.references.get(tuple(seq[:n]), [])
        done = len(seq) - n
        return ref[done:] if ref[:done] == seq[n:] else []

    def propose(self, request_ids, max_tokens):
        out = []
        for rid, limit in zip(request_ids, max_tokens):
            self.limits_seen.append(limit)
            if self.mode == "oracle":
                out.append(self._continuation(rid)[:limit])
            elif self.mode == "greedy-overrun":
                out.append(self._continuation(rid)[:limit + 5])
            elif self.mode == "random":
                out.append([self.rng.randrange(self.vocab) for _ in range(limit)])
            else:  # invalid ids: padding and out-of-range values
                out.append(self._continuation(rid)[:1] + [-1, self.vocab + 7, -1][: max(0, limit - 1)])
        return out


@pytest.fixture
def spec_engine(fresh_registry, make_engine, tiny, tiny_prompts, tiny_reference):
    """make(mode, k, **config) -> (engine, proposer) with the proposer registered as method 'scripted'."""
    references = {tuple(p): r for p, r in zip(tiny_prompts, tiny_reference)}

    def make(mode="oracle", k=3, loaded=None, **config):
        proposer = ScriptedProposer(references, mode, tiny.config.vocab_size)

        class Plugin:
            @hookimpl
            def kernelplane_spec_proposers(self):
                return [Provider(name=f"scripted-{mode}", capability=Capability.SPEC_PROPOSER, priority=100,
                                 factory=lambda request, hardware: proposer,
                                 requirements=Requirements(methods=["scripted"]))]

        fresh_registry.register(Plugin(), name=f"test-proposer-{mode}-{len(fresh_registry.plugins)}")
        engine = make_engine(loaded=loaded, speculative_method="scripted", num_speculative_tokens=k, **config)
        assert engine.selections["spec_proposer"].chosen.name == f"scripted-{mode}"
        return engine, proposer

    return make


def expected_spec_steps(max_tokens: int, k: int) -> int:
    """Steps with drafts when every draft is accepted.

    The first token comes from the prefill; then each step drafts as many as
    fit (k, or fewer so that the bonus token stays within max_tokens) and
    emits them plus the bonus. A last single token needs no drafts.
    """
    remaining, steps = max_tokens - 1, 0
    while remaining >= 2:
        remaining -= min(k, remaining - 1) + 1
        steps += 1
    return steps


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_oracle_drafts_are_all_accepted(spec_engine, tiny_prompts, tiny_reference, k):
    engine, proposer = spec_engine("oracle", k)
    outputs = engine.generate(tiny_prompts[:3], SamplingParams(max_tokens=32, **GREEDY))
    for out, ref in zip(outputs, tiny_reference[:3]):
        assert out.token_ids == ref
        m = out.metrics
        assert m["num_draft_tokens"] > 0 and m["num_accepted_tokens"] == m["num_draft_tokens"]
        assert m["num_spec_steps"] == expected_spec_steps(32, k)
    assert max(proposer.limits_seen) == k
    assert engine.counters["accepted_tokens"] == engine.counters["draft_tokens"]
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert sorted(proposer.removed) == sorted(o.request_id for o in outputs) and not proposer.tokens


@pytest.mark.parametrize("k", [1, 4])
def test_random_drafts_change_nothing(spec_engine, tiny_prompts, tiny_reference, k):
    engine, _ = spec_engine("random", k)
    outputs = engine.generate(tiny_prompts, SamplingParams(max_tokens=32, **GREEDY))
    assert [o.token_ids for o in outputs] == tiny_reference
    drafted = sum(o.metrics["num_draft_tokens"] for o in outputs)
    accepted = sum(o.metrics["num_accepted_tokens"] for o in outputs)
    assert drafted > 100 and accepted <= 0.05 * drafted
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_eos_inside_accepted_drafts_ends_the_request_there(spec_engine, tiny, tiny_prompts, tiny_reference):
    import copy
    import dataclasses

    ref = tiny_reference[1]
    eos = ref[6]
    n = ref.index(eos) + 1
    tokenizer = copy.copy(tiny.tokenizer)
    tokenizer.eos_token_ids = [eos]
    engine, _ = spec_engine("oracle", 5, loaded=dataclasses.replace(tiny, tokenizer=tokenizer))
    out = engine.generate([tiny_prompts[1]], SamplingParams(temperature=0, max_tokens=32))[0]
    assert out.token_ids == ref[:n] and out.finish_reason == "stop"
    assert out.metrics["num_accepted_tokens"] > 0
    assert engine.allocator.num_free == engine.allocator.num_blocks


@pytest.mark.parametrize("mode", ["oracle", "greedy-overrun"])
def test_max_tokens_reached_mid_draft(spec_engine, tiny_prompts, tiny_reference, mode):
    engine, proposer = spec_engine(mode, 5)
    outputs = engine.generate(tiny_prompts[:3], [SamplingParams(max_tokens=m, **GREEDY) for m in (7, 2, 9)])
    for out, ref, m in zip(outputs, tiny_reference, (7, 2, 9)):
        assert out.token_ids == ref[:m] and out.finish_reason == "length"
    assert all(0 <= lim <= 5 for lim in proposer.limits_seen)


def test_context_limit_reached_mid_draft(spec_engine, tiny_prompts, tiny_reference):
    ids = tiny_prompts[2]
    engine, _ = spec_engine("greedy-overrun", 4, max_model_len=len(ids) + 9)
    out = engine.generate([ids], SamplingParams(max_tokens=100, **GREEDY))[0]
    assert out.token_ids == tiny_reference[2][:9] and out.finish_reason == "length"


def test_invalid_draft_ids_never_reach_the_model(spec_engine, tiny_prompts, tiny_reference):
    # -1 padding and ids past the vocabulary are cut off before the forward pass.
    engine, _ = spec_engine("invalid", 4)
    outputs = engine.generate(tiny_prompts[:3], SamplingParams(max_tokens=32, **GREEDY))
    assert [o.token_ids for o in outputs] == tiny_reference[:3]
    assert all(o.metrics["num_draft_tokens"] <= o.metrics["num_spec_steps"] for o in outputs)


def test_mixed_batch_with_an_opted_out_request(spec_engine, tiny_prompts, tiny_reference):
    engine, proposer = spec_engine("oracle", 3)
    params = [SamplingParams(max_tokens=32, **GREEDY), SamplingParams(max_tokens=32, speculative=False, **GREEDY),
              SamplingParams(max_tokens=32, **GREEDY)]
    outputs = engine.generate(tiny_prompts[:3], params)
    assert [o.token_ids for o in outputs] == tiny_reference[:3]
    assert outputs[1].metrics["num_draft_tokens"] == 0 and outputs[1].metrics["num_spec_steps"] == 0
    assert outputs[0].metrics["num_accepted_tokens"] > 0 and outputs[2].metrics["num_accepted_tokens"] > 0
    assert outputs[1].request_id not in proposer.removed  # never handed to the proposer


def test_speculation_with_preemption_and_chunked_prefill(spec_engine, tiny_prompts, tiny_reference):
    engine, _ = spec_engine("oracle", 4, num_kv_blocks=30, block_size=4, max_num_batched_tokens=16)
    outputs = engine.generate(tiny_prompts[1:4], SamplingParams(max_tokens=32, **GREEDY))
    assert engine.counters["preemptions"] > 0
    assert [o.token_ids for o in outputs] == tiny_reference[1:4]
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_sampled_requests_with_speculation_are_reproducible(spec_engine, tiny_prompts):
    sampled = [SamplingParams(temperature=0.8, top_k=20, max_tokens=24, seed=s, ignore_eos=True) for s in (11, 12)]
    runs = []
    for _ in range(2):
        engine, _ = spec_engine("oracle", 3)
        outputs = engine.generate([tiny_prompts[1], tiny_prompts[2], tiny_prompts[0]],
                                  [sampled[0], SamplingParams(max_tokens=24, **GREEDY), sampled[1]])
        assert all(len(o.token_ids) == 24 for o in outputs)
        runs.append([o.token_ids for o in outputs])
    assert runs[0] == runs[1]
    assert engine.counters["draft_tokens"] > 0


def test_speculation_reads_the_exact_tail_like_plain_decoding(spec_engine, make_engine, tiny_prompts):
    """An int8 cache with a 4-token exact tail (a ring of 20 entries that wraps many times). Every token of a
    verification step reads its own latest 4 tokens exact, as a decode step does, and the writes of rejected
    drafts past the sequence's end never reach an entry still read: the tokens equal plain decoding's."""
    greedy = SamplingParams(max_tokens=32, **GREEDY)
    plain = make_engine(kv_cache_dtype="int8", kv_exact_tail=4)
    expected = [o.token_ids for o in plain.generate(tiny_prompts, greedy)]
    for mode in ("random", "oracle"):
        engine, _ = spec_engine(mode, 4, kv_cache_dtype="int8", kv_exact_tail=4)
        assert engine.kv_caches[0].exact_tail.capacity == 20
        outputs = engine.generate(tiny_prompts, greedy)
        assert [o.token_ids for o in outputs] == expected
        assert sum(o.metrics["num_draft_tokens"] for o in outputs) > 30
