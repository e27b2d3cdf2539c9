"""Engine decode step time on a GPU, eager vs CUDA graphs, with greedy
agreement checks (triton vs reference attention; graphs vs eager, also for
TurboQuant caches with their exact tail, and their kernel vs the reference).

    python benchmarks/profile_engine_step.py            # prints a table; writes $OUT/profile.txt if OUT is set
    python benchmarks/profile_engine_step.py --turboquant-only   # only the TurboQuant greedy checks
"""
import os
import sys
import time

import torch

from kernelplane.engine import EngineConfig, LLMEngine, SamplingParams
from kernelplane.models import load_model

out = open(os.path.join(os.environ.get("OUT", "/tmp"), "profile.txt"), "w")


def p(*a):
    print(*a)
    print(*a, file=out)
    out.flush()


prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three primary colors:"]
greedy = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
p(f"# {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d %H:%M')}")
everything = "--turboquant-only" not in sys.argv[1:]
for dtype in ("float32", "bfloat16") if everything else ():
    lm = load_model("default", device="cuda", dtype=dtype, progress=False)
    outs = {}
    for name, kw in [("reference", dict(attention_backend="reference")), ("triton eager", dict(attention_backend="triton", enforce_eager=True)),
                     ("triton graphs", dict(attention_backend="triton"))]:
        eng = LLMEngine(EngineConfig(device="cuda", dtype=dtype, max_model_len=1024, num_kv_blocks=512, max_num_seqs=8, **kw), loaded=lm)
        outs[name] = [o.token_ids for o in eng.generate(prompts, greedy)]
        del eng
    for a, b in [("reference", "triton eager"), ("triton eager", "triton graphs")]:
        same = sum(x == y for x, y in zip(outs[a], outs[b]))
        agree = sum(u == v for x, y in zip(outs[a], outs[b]) for u, v in zip(x, y)) / sum(len(x) for x in outs[a])
        p(f"greedy {dtype}: {a} vs {b}: identical sequences {same}/{len(prompts)}, token agreement {agree:.3f}")

# TurboQuant caches: graph replays must give what eager steps give up to rounding (same offset: both
# engines prime their cache with the same text; the split of the KV range, hence the order of the sums,
# depends on the batch a graph was captured for).
for fmt in ("turboquant2", "turboquant4") if everything else ("turboquant2", "turboquant3", "turboquant4"):
    for dtype in ("float32", "bfloat16"):
        lm = load_model("default", device="cuda", dtype=dtype, progress=False)
        outs = {}
        for name, kw in [("eager", dict(enforce_eager=True)), ("graphs", dict()),
                         ("reference", dict(enforce_eager=True, attention_backend="reference"))]:
            eng = LLMEngine(EngineConfig(device="cuda", dtype=dtype, kv_cache_dtype=fmt, max_model_len=1024, num_kv_blocks=512,
                                         max_num_seqs=8, **kw), loaded=lm)
            outs[name] = [o.token_ids for o in eng.generate(prompts, greedy)]
            del eng
        for a, b in (("eager", "graphs"), ("reference", "eager")):
            same = sum(x == y for x, y in zip(outs[a], outs[b]))
            first_diff = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
                          for x, y in zip(outs[a], outs[b])]
            p(f"greedy {fmt} {dtype} (exact tail 64): {a} vs {b}: identical sequences {same}/{len(prompts)}, "
              f"equal tokens before the first difference {first_diff} of {greedy.max_tokens}")

if not everything:
    sys.exit(0)
lm = load_model("default", device="cuda", dtype="bfloat16", progress=False)
p("| attention | mode | batch | ms/step | tokens/s |")
p("|---|---|---|---|---|")
for name, kw in [("triton", dict(enforce_eager=True)), ("triton", dict())]:
    eng = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=2048, max_num_seqs=64, **kw), loaded=lm)
    mode = "eager" if kw else "cuda graphs"
    for bs in (1, 8, 64):
        for i in range(bs):
            eng.add_request(None, prompts[i % 4], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        n = 50
        for _ in range(n):
            eng.step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / n
        p(f"| {name} | {mode} | {bs} | {dt * 1000:.2f} | {bs / dt:.0f} |")
        for rid in list(eng.requests):
            eng.abort_request(rid)
    del eng
