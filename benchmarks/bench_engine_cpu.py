"""Decode speed on CPU: kernelplane's engine vs transformers ``generate``, SmolLM2-135M.

Both run the embedded SmolLM2 GGUF dequantized to float32, greedy, with the
same torch thread count. Decode tokens/s excludes prefill: each side is timed
for 1 and for ``1 + N`` new tokens, and the difference gives N decode steps.
"Batch 1" is one request; "8 concurrent" is 8 different prompts at once
(transformers: one left-padded batch; the engine: 8 requests in its
continuous batch).

The matmul-only column is the hardware limit for these weights: the model's matrix
products alone (every linear layer and the LM head, at the batch's row
count), timed in the same run. At small batches a decode step reads every
weight once, so no implementation of the same model in the same dtype can
beat it by much.

    .venv/bin/python benchmarks/bench_engine_cpu.py [--tokens 64] [--threads N] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three primary colors:", "The speed of light in vacuum is", "import numpy as np\n",
           "My favourite recipe for pancakes", "Dear team, thank you for"]


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def engine_run(engine, prompts: list[list[int]], new_tokens: int) -> float:
    from kernelplane.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def run():
        engine.generate(prompts, params)

    return run


def hf_run(model, tokenizer, texts: list[str], new_tokens: int):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True)

    def run():
        with torch.inference_mode():
            model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=tokenizer.pad_token_id)

    return run


def matmul_only_tokens_per_s(hf_model, batch: int, repeats: int) -> float:
    """Tokens/s if a decode step cost only its matrix products (the weights read once per step)."""
    weights = [m.weight for m in hf_model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights}

    def run():
        with torch.inference_mode():
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)

    run()
    return batch / best_of(run, repeats * 3)


def decode_tokens_per_s(make_run, batch: int, tokens: int, repeats: int) -> float:
    t_prefill = best_of(make_run(1), repeats)
    t_full = best_of(make_run(1 + tokens), repeats)
    return batch * tokens / max(t_full - t_prefill, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights, both sides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kernelplane.engine import EngineConfig, LLMEngine
    from kernelplane.models import load_model, resolve_model_path

    path = resolve_model_path("default")
    loaded = load_model("default", device="cpu", dtype=args.dtype, progress=False)
    engine = LLMEngine(EngineConfig(device="cpu", dtype=args.dtype, max_num_seqs=8, max_model_len=512), loaded=loaded)
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, args.dtype)).eval()
    attention = engine.selections["attention"].chosen.name

    print(f"# engine decode vs transformers generate, SmolLM2-135M {args.dtype}, greedy, {args.tokens} decode tokens")
    print(f"# {date.today()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, engine attention={attention}")
    print(f"{'batch':>6} {'transformers tok/s':>19} {'engine tok/s':>13} {'ratio':>6} {'matmul-only tok/s':>19} "
          f"{'engine/matmul-only':>19}")
    for batch in (1, 8):
        texts = PROMPTS[:batch]
        ids = [loaded.tokenizer.encode(t) for t in texts]
        hf_rate = decode_tokens_per_s(lambda n: hf_run(hf, hf_tok, texts, n), batch, args.tokens, args.repeats)
        kp_rate = decode_tokens_per_s(lambda n: engine_run(engine, ids, n), batch, args.tokens, args.repeats)
        floor = matmul_only_tokens_per_s(hf, batch, args.repeats)
        print(f"{batch:>6} {hf_rate:>19.1f} {kp_rate:>13.1f} {kp_rate / hf_rate:>6.2f} {floor:>19.1f} "
              f"{kp_rate / floor:>19.2f}")


if __name__ == "__main__":
    main()
