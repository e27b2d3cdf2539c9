"""Where a GPU decode step's time goes: host-side profile of engine steps.

For batch sizes 1 and 8, with speculation off and with ``ngram``, runs the
engine's steps under cProfile (host time; a device sync shows up as time in
the call that waits) and prints ms per step and the top functions.

    python benchmarks/profile_step_breakdown.py [--steps 100] [--top 18]
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

from kernelplane.engine import EngineConfig, LLMEngine, SamplingParams
from kernelplane.models import load_model

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=100)
ap.add_argument("--top", type=int, default=18)
args = ap.parse_args()

TEXT = ("Repeat the following text exactly. The lighthouse stood on a rocky island far from the coast. Every night "
        "the keeper climbed the spiral stairs, lit the great lamp and watched the ships pass through the strait.")
print(f"# {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}")
lm = load_model("default", device="cuda", dtype="bfloat16", progress=False)
for spec in (None, "ngram"):
    eng = LLMEngine(EngineConfig(device="cuda", dtype="bfloat16", max_model_len=2048, max_num_seqs=8,
                                 speculative_method=spec, num_speculative_tokens=4), loaded=lm)
    prompt = eng.tokenizer.apply_chat_template([{"role": "user", "content": TEXT}])
    for bs in (1, 8):
        for _ in range(bs):
            eng.add_request(None, prompt, SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True))
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
        tokens = 0
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        for _ in range(args.steps):
            tokens += sum(len(o.new_token_ids) for o in eng.step())
        torch.cuda.synchronize()
        prof.disable()
        dt = (time.perf_counter() - t) / args.steps
        print(f"\n## speculative={spec} batch={bs}: {dt * 1e3:.2f} ms/step, {tokens / args.steps / bs:.2f} tokens/step/seq, "
              f"{tokens / (dt * args.steps):.0f} tok/s (under cProfile)")
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        print("\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip()))
        for rid in list(eng.requests):
            eng.abort_request(rid)
    del eng
