"""KV-cache formats in the whole engine on a GPU: cache capacity, greedy agreement, decode step time.

For each ``--kv-cache-dtype`` (the model's own dtype, then TurboQuant 4/3/2
bits): the attention backend selection picked, how many tokens the cache
holds in the same memory, greedy continuations of four prompts compared
token by token with the plain cache's, and the decode step time (CUDA
graphs) at batch 1 / 8 / 64 with every sequence at ``--context`` tokens.
The embedded SmolLM2-135M (9 query / 3 KV heads, head dim 64) in bfloat16.
A format written ``turboquant3@0`` runs with ``kv_exact_tail=0`` (no exact
first and latest tokens; the default keeps 64).

    python benchmarks/bench_engine_kv_formats.py [--context 2048] [--steps 30] [--formats auto,turboquant3@0]
"""
from __future__ import annotations

import argparse
import time

import torch

from kernelplane.engine import EngineConfig, LLMEngine, SamplingParams
from kernelplane.models import load_model

FORMATS = ("auto", "turboquant4", "turboquant3", "turboquant2", "turboquant4@0", "turboquant3@0", "turboquant2@0")
DECODE_ROOM = 128  # positions each sequence keeps free after --context for the timed decode steps
# Prompt tokens per engine step while the batch prefills. The sequences that finish their prompt
# first decode while the rest prefill; with the engine's default (2048) 64 prompts of 8k tokens take
# about 250 steps, long enough for the first ones to reach max_tokens and leave the timed batch.
PREFILL_TOKENS_PER_STEP = 32768
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three primary colors:"]


def decode_step_ms(engine: LLMEngine, prompt_ids: list[int], batch: int, steps: int) -> float:
    for _ in range(batch):
        engine.add_request(None, prompt_ids, SamplingParams(max_tokens=steps + 64, temperature=0, ignore_eos=True))
    while any(len(r.output_ids) == 0 for r in engine.requests.values()):  # prefill everything first
        engine.step()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    running = len(engine.running)
    if running != batch:  # a step time for a smaller batch than the table says
        raise SystemExit(f"only {running} of {batch} sequences were still decoding after the timed steps")
    for rid in list(engine.requests):
        engine.abort_request(rid)
    return elapsed * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--show", action="store_true", help="also print each format's continuations, first 12 tokens")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated; the first is the reference")
    args = ap.parse_args()
    lm = load_model("default", device="cuda", dtype="bfloat16", progress=False)
    longest = lm.config.max_position_embeddings - DECODE_ROOM
    if args.context > longest:
        ap.error(f"--context {args.context} does not fit the model's {lm.config.max_position_embeddings} positions "
                 f"with the decode steps after it; at most {longest}")
    text = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(2000))
    long_ids = lm.tokenizer.encode(text, add_special_tokens=False)[: args.context - 64]
    print(f"# {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
          f"context {len(long_ids)} + decode")
    print("| KV cache | exact tail | attention | cache tokens | vs plain | greedy tokens equal to plain | "
          "identical sequences | step ms b1 | b8 | b64 | graphed steps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    plain = None
    for spec in args.formats.split(","):
        fmt, _, tail = spec.partition("@")
        tail_kw = {"kv_exact_tail": int(tail)} if tail else {}
        engine = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", kv_cache_dtype=fmt, max_model_len=args.context + DECODE_ROOM,
                                        max_num_seqs=64, max_num_batched_tokens=PREFILL_TOKENS_PER_STEP, **tail_kw),
                           loaded=lm)
        capacity = engine.num_kv_blocks * engine.block_size
        outs = [o.token_ids for o in engine.generate(PROMPTS, SamplingParams(max_tokens=args.gen, temperature=0,
                                                                            ignore_eos=True))]
        if plain is None:
            plain = dict(outs=outs, capacity=capacity)
        equal = sum(a == b for x, y in zip(outs, plain["outs"]) for a, b in zip(x, y))
        same = sum(x == y for x, y in zip(outs, plain["outs"]))
        if args.show:
            print(f"<!-- {spec}: {[lm.tokenizer.decode(o[:12]) for o in outs]} -->", flush=True)
        times = [decode_step_ms(engine, long_ids, b, args.steps) for b in (1, 8, 64)]
        backend = engine.selections["attention"].chosen.name
        print(f"| {fmt} | {engine.exact_tail or '-'} | {backend} | {capacity:,} | {capacity / plain['capacity']:.2f}x | "
              f"{equal}/{len(PROMPTS) * args.gen} | {same}/{len(PROMPTS)} | "
              + " | ".join(f"{t:.2f}" for t in times) + f" | {engine.counters['steps_graphed']} |", flush=True)
        del engine
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
