"""Where a GPU decode step's time goes, with and without speculation.

For batch sizes 1 and 8, speculation off and ``ngram`` (k = 4), runs engine
steps with light wall-clock timers around the engine's phases (cProfile's
per-call cost would distort a 1-2 ms step) and prints ms per step per
phase. A host-to-device copy after the graph replay waits for the GPU, so
the forward's device time lands in ``graph run``; ``replay only`` is the
captured graph alone, timed with CUDA events.

    python benchmarks/profile_step_breakdown.py [--steps 100]
"""
import argparse
import collections
import time

import torch

import kernelplane.engine.engine as engine_module
from kernelplane.engine import EngineConfig, LLMEngine, SamplingParams
from kernelplane.engine.cuda_graphs import StepGraphs
from kernelplane.engine.detokenizer import IncrementalDetokenizer
from kernelplane.engine.request import Request
from kernelplane.models import load_model

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=100)
args = ap.parse_args()

spent = collections.Counter()


def timed(owner, name, label):
    original = getattr(owner, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            spent[label] += time.perf_counter() - t
    setattr(owner, name, wrapper)


for owner, name, label in [(LLMEngine, "_schedule", "schedule (incl. propose)"), (LLMEngine, "_propose", "  propose"),
                           (StepGraphs, "run", "graph run (waits for GPU)"), (LLMEngine, "_append", "append tokens"),
                           (IncrementalDetokenizer, "add", "  detokenize"), (Request, "output", "build outputs"),
                           (engine_module, "greedy_accept", "greedy accept")]:
    timed(owner, name, label)

TEXT = ("Repeat the following text exactly. The lighthouse stood on a rocky island far from the coast. Every night "
        "the keeper climbed the spiral stairs, lit the great lamp and watched the ships pass through the strait.")
print(f"# {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}")
lm = load_model("default", device="cuda", dtype="bfloat16", progress=False)
for spec in (None, "ngram"):
    eng = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=2048, max_num_seqs=8,
                                 speculative_method=spec, num_speculative_tokens=4), loaded=lm)
    timed(eng.model, "compute_logits", "logits")
    if eng.proposer is not None:
        timed(eng.proposer, "extend", "proposer extend")
    prompt = eng.tokenizer.apply_chat_template([{"role": "user", "content": TEXT}])
    for bs in (1, 8):
        for _ in range(bs):
            eng.add_request(None, prompt, SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True))
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
        spent.clear()
        tokens = 0
        t = time.perf_counter()
        for _ in range(args.steps):
            tokens += sum(len(o.new_token_ids) for o in eng.step())
        torch.cuda.synchronize()
        step = (time.perf_counter() - t) / args.steps
        print(f"\n## speculative={spec} batch={bs}: {step * 1e3:.3f} ms/step, {tokens / args.steps / bs:.2f} tokens/step/seq, "
              f"{tokens / (step * args.steps):.0f} tok/s")
        for label, s in sorted(spent.items(), key=lambda kv: -kv[1]):
            print(f"  {label:28s} {s / args.steps * 1e3:7.3f} ms/step")
        for q, graphs in sorted(eng.step_graphs.items()):
            graph, _ = graphs.graphs[graphs.padded_size(bs)]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            print(f"  replay only, {q} token(s)/seq: {start.elapsed_time(end) / 50:.3f} ms")
        for rid in list(eng.requests):
            eng.abort_request(rid)
    del eng
