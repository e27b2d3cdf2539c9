"""End to end: the engine with ngram speculation gives the same greedy tokens as without.

Runs the embedded SmolLM2 on the CPU (loaded once for the module) with short
generations, over batch mixes and draft lengths k = 1..5.
"""
import pytest

from kernelplane.engine import EngineConfig, LLMEngine, SamplingParams

DOC = ("The lighthouse stood on a rocky island far from the coast. Every night the keeper climbed "
       "the spiral stairs, lit the great lamp and watched the ships pass safely through the strait.")
PROMPTS = {
    # Copying a passage: drafts from the prompt should be accepted.
    "repeat": f"Copy the text exactly.\nText: {DOC}\nCopy: {DOC}\nCopy:",
    "code": "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
    "chat": "Once upon a time, in a small village,",
    "fact": "The capital of France is",
}
MAX_TOKENS = 16
MAX_MODEL_LEN = 256

# (k, prompts in the batch); "chat*" opts out of speculation for that request.
RUNS = [
    (1, ["repeat", "code", "chat"]),
    (2, ["repeat", "chat"]),
    (3, ["code", "repeat", "chat*"]),
    (4, ["repeat"]),
    (5, ["fact", "repeat"]),
]


def _params(speculative=True):
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, speculative=speculative)


@pytest.fixture(scope="module")
def loaded():
    from kernelplane.models import load_model

    return load_model("default")


@pytest.fixture(scope="module")
def reference(loaded):
    """Greedy tokens per prompt with speculation off, all prompts in one batch."""
    engine = LLMEngine(EngineConfig(max_model_len=MAX_MODEL_LEN), loaded=loaded)
    outs = engine.generate(list(PROMPTS.values()), _params())
    assert "draft_tokens" not in engine.stats()
    return {name: out.token_ids for name, out in zip(PROMPTS, outs)}


@pytest.mark.parametrize("k,batch", RUNS, ids=[f"k{k}-{'+'.join(b)}" for k, b in RUNS])
def test_greedy_output_unchanged(loaded, reference, k, batch):
    engine = LLMEngine(EngineConfig(max_model_len=MAX_MODEL_LEN, speculative_method="ngram",
                                    num_speculative_tokens=k), loaded=loaded)
    assert engine.selections["spec_proposer"].chosen.name == "ngram"
    names = [b.rstrip("*") for b in batch]
    for i, (name, tag) in enumerate(zip(names, batch)):
        engine.add_request(str(i), PROMPTS[name], _params(speculative=not tag.endswith("*")))
    final, steps = {}, 0
    while engine.has_unfinished_requests():
        steps += 1
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    outs = [final[str(i)] for i in range(len(batch))]
    for name, tag, out in zip(names, batch, outs):
        assert out.token_ids == reference[name], f"{name}: speculative output differs from plain greedy (k={k})"
        m = out.metrics
        assert 0 <= m["num_accepted_tokens"] <= m["num_draft_tokens"] <= k * max(m["num_spec_steps"], 1)
        if tag.endswith("*"):
            assert m["num_draft_tokens"] == 0, "a request that opted out must get no drafts"
    repeat = outs[names.index("repeat")]
    assert repeat.metrics["num_accepted_tokens"] > 0, "the copying prompt should accept drafts"
    if batch == ["repeat"] and k >= 3:
        # Alone, the copying prompt emits several tokens a step (one step is the prefill).
        assert len(repeat.token_ids) / (steps - 1) > 2, f"{len(repeat.token_ids)} tokens in {steps - 1} decode steps"
    stats = engine.stats()
    assert stats.get("accepted_tokens", 0) == sum(o.metrics["num_accepted_tokens"] for o in outs)
    assert stats.get("draft_tokens", 0) == sum(o.metrics["num_draft_tokens"] for o in outs)

