"""Engine tokens/s with and without n-gram speculative decoding.

Two tasks:
- ``favourable``: the prompt holds a document (or code) and asks to repeat
  or lightly edit it, so the output copies long spans of the prompt;
- ``unfavourable``: open-ended chat, where the prompt has little to copy.

Each task runs at each concurrency (requests in flight, one wave) with
speculation off and with ``--speculative ngram``, greedy, the same number of
output tokens per request (``ignore_eos``). Prints output tokens/s, the
speed-up, the draft acceptance rate, the mean acceptance length (tokens
emitted per verification step of a speculating request: 1 + accepted drafts)
and whether the outputs equal those without speculation.

    python benchmarks/bench_spec_decode.py --device cpu --max-tokens 48
    python benchmarks/bench_spec_decode.py --device cuda --concurrency 1 8 32 -k 4
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import time
from datetime import date

import torch

from kernelplane.engine import EngineConfig, LLMEngine, SamplingParams
from kernelplane.models import load_model

DOCUMENTS = [
    "The lighthouse stood on a rocky island far from the coast. Every night the keeper climbed the spiral "
    "stairs, lit the great lamp and watched the ships pass safely through the narrow strait. In winter the "
    "storms were so strong that the whole tower shook, but the light never went out.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into "
    "glucose and oxygen. It takes place in the chloroplasts, which contain the pigment chlorophyll. The "
    "oxygen is released into the air, and the glucose feeds the plant.",
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n\n\n"
    "def variance(values):\n    m = mean(values)\n    total = 0\n    for v in values:\n        total += (v - m) ** 2\n"
    "    return total / len(values)\n",
    "Our meeting is moved from Tuesday to Thursday at ten in the morning. Please bring the quarterly report, "
    "the updated budget and your notes on the new hiring plan. Lunch will be served after the meeting in "
    "the small conference room on the third floor.",
]
INSTRUCTIONS = [
    "Repeat the following text exactly, word for word.",
    "Rewrite the following text, keeping it as close to the original as possible.",
]
CHAT = [
    "Write a short poem about the sea at night.",
    "What are some good ways to stay focused while studying?",
    "Tell me a story about a dragon who is afraid of the dark.",
    "Why do people enjoy travelling to new places?",
    "Give me three ideas for a weekend project with kids.",
    "Describe your ideal city in a few sentences.",
    "What makes a good friend?",
    "Invent a new holiday and explain how people celebrate it.",
]


def task_prompts(engine: LLMEngine, task: str, n: int) -> list[str]:
    messages = []
    for i in range(n):
        if task == "favourable":
            doc, instr = DOCUMENTS[i % len(DOCUMENTS)], INSTRUCTIONS[(i // len(DOCUMENTS)) % len(INSTRUCTIONS)]
            messages.append(f"{instr}\n\n{doc}")
        else:
            messages.append(CHAT[i % len(CHAT)])
    tok = engine.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": m}]) for m in messages]


def run_level(engine: LLMEngine, prompts: list[str], max_tokens: int, temperature: float) -> dict:
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True, seed=i)
              for i in range(len(prompts))]
    _sync(engine)
    steps = collections.Counter()
    step = engine.step

    def timed_step():  # time per kind of step: graphed decode/verify vs eager (prefill)
        eager = engine.counters["steps_eager"]
        t = time.perf_counter()
        out = step()
        kind = "steps_eager" if engine.counters["steps_eager"] > eager else "steps_graphed"
        steps[kind] += 1
        steps[kind + "_s"] += time.perf_counter() - t
        return out

    engine.step = timed_step
    t0 = time.perf_counter()
    try:
        outs = engine.generate(prompts, params)
    finally:
        del engine.step
    _sync(engine)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    drafts = sum(o.metrics["num_draft_tokens"] for o in outs)
    accepted = sum(o.metrics["num_accepted_tokens"] for o in outs)
    spec_steps = sum(o.metrics["num_spec_steps"] for o in outs)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "draft_tokens": drafts,
            "accepted_tokens": accepted, "spec_steps": spec_steps,
            "acceptance_rate": accepted / drafts if drafts else None,
            "mean_acceptance_length": 1 + accepted / spec_steps if spec_steps else None,
            **{k: steps[k] for k in ("steps_graphed", "steps_eager", "steps_graphed_s", "steps_eager_s")},
            "outputs": [o.token_ids for o in outs]}


def _steps(run: dict) -> str:
    return f"{run['steps_graphed'] + run['steps_eager']}"


def _sync(engine: LLMEngine) -> None:
    if engine.device == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


def same_column(row: dict, temperature: float) -> str:
    # Sampled outputs differ run to run by design; only greedy ones must match.
    return f"{row['same_outputs']}/{row['concurrency']}" if temperature == 0 else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tasks", nargs="+", default=["favourable", "unfavourable"], choices=["favourable", "unfavourable"])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--speculative-options", default="{}", help='JSON for the proposer, e.g. \'{"prompt_lookup_max": 5}\'')
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (outputs comparable token by token)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per level, the last one reported (default: 2 on cuda, where the first "
                         "compiles kernels for new shapes; 1 on cpu)")
    ap.add_argument("--attention-backend", help="explicit attention provider for both engines")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    probe = EngineConfig(model=args.model, device=args.device, dtype=args.dtype)
    device = probe.resolved_device()
    lm = load_model(args.model, device=device, dtype=probe.resolved_dtype(device))  # shared by both engines
    common = dict(model=args.model, device=device, dtype=args.dtype, max_num_seqs=max(args.concurrency),
                  max_model_len=args.max_model_len, attention_backend=args.attention_backend)
    repeats = args.repeats or (2 if device == "cuda" else 1)
    engines = {
        "off": LLMEngine(EngineConfig(**common), loaded=lm),
        "ngram": LLMEngine(EngineConfig(**common, speculative_method="ngram",
                                        num_speculative_tokens=args.num_speculative_tokens,
                                        speculative_options=json.loads(args.speculative_options)), loaded=lm),
    }
    for engine in engines.values():  # warm-up: first-call costs stay out of the numbers
        engine.generate(task_prompts(engine, "unfavourable", 2), SamplingParams(max_tokens=4, temperature=0))

    off = engines["off"]
    rows = []
    for task in args.tasks:
        for conc in args.concurrency:
            prompts = task_prompts(off, task, conc)
            for _ in range(repeats):
                base = run_level(off, prompts, args.max_tokens, args.temperature)
                spec = run_level(engines["ngram"], prompts, args.max_tokens, args.temperature)
            same = sum(a == b for a, b in zip(base["outputs"], spec["outputs"]))
            rows.append({"task": task, "concurrency": conc, "off": base, "ngram": spec, "same_outputs": same,
                         "speedup": spec["tokens_per_s"] / base["tokens_per_s"]})

    sel = engines["ngram"].selections
    print(f"speculative decoding: ngram (k={args.num_speculative_tokens}, options {args.speculative_options}) vs off; "
          f"model {args.model}, {args.max_tokens} output tokens a request, "
          + ("greedy" if args.temperature == 0 else f"sampled at temperature {args.temperature}")
          + f", last of {repeats} run(s)")
    print(f"device: {device_name(off.device)} ({off.dtype}, attention={sel['attention'].chosen.name}), "
          f"{date.today().isoformat()}")
    header = (f"{'task':<13} {'conc':>4} {'off tok/s':>10} {'ngram tok/s':>12} {'speed-up':>9} {'accepted':>9} "
              f"{'mean acc len':>13} {'same out':>9} {'steps off/ngram':>16} {'ms graphed off/ngram':>21} {'ms eager off/ngram':>19}")
    print(header)
    print("-" * len(header))
    for r in rows:
        s = r["ngram"]
        rate = f"{s['acceptance_rate']:.0%}" if s["acceptance_rate"] is not None else "-"
        mal = f"{s['mean_acceptance_length']:.2f}" if s["mean_acceptance_length"] is not None else "-"
        print(f"{r['task']:<13} {r['concurrency']:>4} {r['off']['tokens_per_s']:>10.1f} {s['tokens_per_s']:>12.1f} "
              f"{r['speedup']:>8.2f}x {rate:>9} {mal:>13} {same_column(r, args.temperature):>9} "
              f"{_steps(r['off']):>7} / {_steps(s):<7} {r['off']['steps_graphed_s'] * 1e3:>10.1f} / {s['steps_graphed_s'] * 1e3:<8.1f}"
              f" {r['off']['steps_eager_s'] * 1e3:>9.1f} / {s['steps_eager_s'] * 1e3:<7.1f}")
    if args.json:
        for r in rows:
            for key in ("off", "ngram"):
                r[key].pop("outputs")
        with open(args.json, "w") as f:
            json.dump({"device": device_name(off.device), "date": date.today().isoformat(), "args": vars(args),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
