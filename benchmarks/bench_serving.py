"""Load generator for a running kernelplane (or any OpenAI-compatible) server.

Sends streamed /v1/completions at several concurrency levels and prints
output tokens/s, time to first token and inter-token latency per level.

    python benchmarks/bench_serving.py --url http://127.0.0.1:8000 --concurrency 1 8 64 --max-tokens 128
    python benchmarks/bench_serving.py --spawn "--device cuda --max-num-seqs 64" --concurrency 1 8 64

``--spawn ARGS`` starts ``kernelplane serve ARGS`` on a free port, waits for
/health, runs the levels and stops it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from datetime import date

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List some good habits for writing maintainable software, with a sentence on each.",
    "Describe the water cycle in detail.",
]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": stamps[0] - start if stamps else float("nan"), "tokens": tokens, "latency": end - start,
            "itl": [(b - a) for a, b in zip(stamps, stamps[1:])]}


async def run_level(url: str, model: str, concurrency: int, num_requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        queue = list(range(num_requests))
        results = []

        async def worker():
            while queue:
                i = queue.pop()
                results.append(await one_request(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    itl = [x for r in results for x in r["itl"]]
    return {"concurrency": concurrency, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_ms_p50": 1000 * statistics.median(r["ttft"] for r in results),
            "itl_ms_p50": 1000 * statistics.median(itl) if itl else float("nan"),
            "itl_ms_p90": 1000 * statistics.quantiles(itl, n=10)[-1] if len(itl) > 10 else float("nan")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("server did not become healthy in time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="default")
    ap.add_argument("--spawn", help="start `kernelplane serve` with these extra arguments")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json-out")
    args = ap.parse_args()

    proc = None
    url = args.url
    if args.spawn is not None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "kernelplane.cli", "serve", "--port", str(port), *shlex.split(args.spawn)]
        print("starting:", " ".join(cmd), file=sys.stderr)
        proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, env=os.environ.copy())
    try:
        if proc is not None:
            _wait_healthy(url, proc)
        kernels = httpx.get(f"{url}/v1/kernels", timeout=10).json() if proc is not None else {}
        rows = []
        for c in args.concurrency:
            asyncio.run(run_level(url, args.model, c, c, 8))  # warm-up at this batch size
            rows.append(asyncio.run(run_level(url, args.model, c, c * args.requests_per_stream, args.max_tokens)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"# serving benchmark, {date.today()}, max_tokens={args.max_tokens}, greedy, ignore_eos")
    if kernels:
        print(f"# kernels: {json.dumps(kernels)[:400]}")
    print("| concurrency | requests | output tok/s | TTFT p50 ms | ITL p50 ms | ITL p90 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['ttft_ms_p50']:.1f} | {r['itl_ms_p50']:.2f} | {r['itl_ms_p90']:.2f} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
