"""AsyncLLMEngine: the engine on its own thread behind asyncio streams."""
import asyncio
import time

import pytest

from kernelplane.engine import AsyncLLMEngine, PromptTooLongError, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture
def async_engine(make_engine):
    engines = []

    def make(**overrides):
        engine = AsyncLLMEngine(engine=make_engine(**overrides))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


async def collect(engine, ids, params, rid=None):
    outs = []
    async for out in engine.generate(ids, params, request_id=rid):
        outs.append(out)
    return outs


def wait_until(condition, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_concurrent_streams_match_offline(async_engine, tiny_prompts, tiny_reference):
    engine = async_engine()

    async def main():
        return await asyncio.gather(*(collect(engine, ids, SamplingParams(max_tokens=32, **GREEDY))
                                      for ids in tiny_prompts[:2]))

    results = asyncio.run(main())
    for outs, ref in zip(results, tiny_reference[:2]):
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert [o.finished for o in outs[:-1]] == [False] * (len(outs) - 1)
        assert outs[-1].token_ids == ref
        assert sum((o.new_token_ids for o in outs), []) == ref
    assert wait_until(lambda: engine.engine.allocator.num_free == engine.engine.allocator.num_blocks)


def test_breaking_out_early_aborts_and_frees_blocks(async_engine, tiny_prompts, tiny_reference):
    engine = async_engine(max_num_seqs=2)
    inner = engine.engine

    async def main():
        seen = []
        stream = engine.generate(tiny_prompts[3], SamplingParams(max_tokens=10_000, **GREEDY), request_id="quitter")
        async for out in stream:
            seen.append(out)
            if len(seen) == 3:
                break
        await stream.aclose()  # what `async for` leaves to the garbage collector, done now
        # Meanwhile another request runs to completion, unaffected.
        other = await collect(engine, tiny_prompts[1], SamplingParams(max_tokens=32, **GREEDY))
        return seen, other

    seen, other = asyncio.run(main())
    assert len(seen) == 3 and not seen[-1].finished
    assert other[-1].token_ids == tiny_reference[1]
    assert wait_until(lambda: "quitter" not in inner.requests and not inner.has_unfinished_requests())
    assert inner.counters["finished_abort"] == 1
    assert wait_until(lambda: inner.allocator.num_free == inner.allocator.num_blocks)


def test_cancelled_consumer_aborts(async_engine, tiny_prompts):
    engine = async_engine()
    inner = engine.engine

    async def main():
        task = asyncio.create_task(collect(engine, tiny_prompts[2], SamplingParams(max_tokens=10_000, **GREEDY), "c"))
        while inner.counters["generation_tokens"] < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert wait_until(lambda: "c" not in inner.requests)
    assert wait_until(lambda: inner.allocator.num_free == inner.allocator.num_blocks)


def test_bad_requests_raise_in_the_caller(async_engine, tiny_prompts):
    engine = async_engine(max_model_len=16)

    async def first(params, ids):
        async for _ in engine.generate(ids, params):
            break

    with pytest.raises(PromptTooLongError):
        asyncio.run(first(SamplingParams(), list(range(3, 40))))
    with pytest.raises(ValueError, match="top_p"):
        asyncio.run(first(SamplingParams(top_p=2.0), tiny_prompts[0]))
    # The engine still serves.
    outs = asyncio.run(collect(engine, tiny_prompts[0], SamplingParams(max_tokens=3, **GREEDY)))
    assert outs[-1].finished and len(outs[-1].token_ids) == 3
