"""CPU cost of one n-gram proposer step (propose + extend) against context length.

Compares kernelplane-spec-ngram's incremental index with two proposers that
rescan the whole context every step under the same matching rule:
a vectorized numpy scan (the fast way to rescan; cost grows with length)
and the plain Python reference scan (``match_rule.scan_draft``).

Two kinds of step, because a rescan's cost depends on where it finds a match:
- ``copy``: the output copies an earlier passage (drafts hit, the match is recent);
- ``novel``: the output is new text (no long suffix recurs: the scan reads everything).

    python benchmarks/bench_ngram_proposer.py
    python benchmarks/bench_ngram_proposer.py --lengths 1000 10000 100000 --steps 200
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from datetime import date

import numpy as np

from kernelplane.capabilities import SpecRequest
from kernelplane_spec_ngram import NgramProposer, scan_draft
from kernelplane_spec_ngram.match_rule import continue_from

VOCAB = 32000


class PythonRescanProposer:
    """Rescans the context in pure Python each step (the reference rule)."""

    def __init__(self, min_n: int, max_n: int, k: int):
        self.min_n, self.max_n, self.k = min_n, max_n, k
        self.tokens: list[int] = []

    def add_request(self, rid, prompt):
        self.tokens = list(prompt)

    def propose(self, rids, limits):
        return [scan_draft(self.tokens, self.min_n, self.max_n, min(self.k, limits[0]))]

    def extend(self, rid, toks):
        self.tokens += toks


class NumpyRescanProposer:
    """Rescans the context with vectorized comparisons each step: O(length * n) at ~ns per token."""

    def __init__(self, min_n: int, max_n: int, k: int):
        self.min_n, self.max_n, self.k = min_n, max_n, k
        self.buf = np.zeros(1024, dtype=np.int64)
        self.length = 0

    def add_request(self, rid, prompt):
        self.length = 0
        self.extend(rid, prompt)

    def extend(self, rid, toks):
        need = self.length + len(toks)
        if need > len(self.buf):  # amortized growth, as a real implementation would keep
            self.buf = np.concatenate([self.buf, np.zeros(max(need, len(self.buf)), dtype=np.int64)])
        self.buf[self.length:need] = toks
        self.length = need

    def propose(self, rids, limits):
        k, length, arr = min(self.k, limits[0]), self.length, self.buf
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = arr[length - n:length]
            starts = length - n  # occurrences arr[i:i+n] with i + n <= length - 1
            hit = arr[0:starts] == suffix[0]
            for j in range(1, n):
                hit &= arr[j:starts + j] == suffix[j]
            found = np.flatnonzero(hit)
            if found.size:
                return [[int(t) for t in continue_from(arr[:length], int(found[-1]) + n, k)]]
        return [[]]


def make_context(length: int, rng: random.Random) -> list[int]:
    """Text-like tokens: fresh tokens with earlier passages copied in (about a third of the text)."""
    toks: list[int] = []
    while len(toks) < length:
        if len(toks) > 200 and rng.random() < 0.3:
            start = rng.randrange(len(toks) - 100)
            toks += toks[start:start + rng.randint(20, 100)]
        else:
            toks += [rng.randrange(VOCAB) for _ in range(rng.randint(20, 100))]
    return toks[:length]


def continuation(context: list[int], kind: str, steps: int, k: int, rng: random.Random) -> list[int]:
    need = steps * (k + 1) + 8
    if kind == "copy":
        start = rng.randrange(len(context) // 2, len(context) - 10)
        span = context[start:start + need]
        return span + [rng.randrange(VOCAB) for _ in range(need - len(span))]
    return [rng.randrange(VOCAB) for _ in range(need)]


def time_steps(proposer, context, future, steps, k) -> tuple[float, list[list[int]]]:
    """Median seconds per step; each step proposes, then extends like the engine would."""
    proposer.add_request("r", context)
    pos, times, drafts = 0, [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        [draft] = proposer.propose(["r"], [k])
        accepted = 0
        while accepted < len(draft) and draft[accepted] == future[pos + accepted]:
            accepted += 1
        kept = future[pos:pos + accepted + 1]
        proposer.extend("r", kept)
        times.append(time.perf_counter() - t0)
        drafts.append(draft)
        pos += len(kept)
    return statistics.median(times), drafts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("-k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--min-n", type=int, default=2)
    ap.add_argument("--max-n", type=int, default=4)
    ap.add_argument("--python-scan-max", type=int, default=100000,
                    help="skip the pure-Python rescan above this length (it is slow)")
    args = ap.parse_args()

    print(f"n-gram proposer step cost (propose + extend), n={args.min_n}..{args.max_n}, k={args.k}, "
          f"median of {args.steps} steps")
    print(f"device: CPU ({_cpu_name()}), {date.today().isoformat()}")
    header = f"{'context':>8} {'step':>6} {'incremental':>12} {'numpy rescan':>13} {'ratio':>7} {'python rescan':>14} {'ratio':>8} {'accept':>7}"
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        for kind in ("copy", "novel"):
            rng = random.Random(length)
            context = make_context(length, rng)
            future = continuation(context, kind, args.steps, args.k, rng)
            inc = NgramProposer.from_request(SpecRequest(method="ngram", num_speculative_tokens=args.k, options={
                "prompt_lookup_min": args.min_n, "prompt_lookup_max": args.max_n, "backoff": False}))
            t_inc, d_inc = time_steps(inc, context, future, args.steps, args.k)
            t_np, d_np = time_steps(NumpyRescanProposer(args.min_n, args.max_n, args.k), context, future, args.steps, args.k)
            assert d_np == d_inc, "the numpy rescan disagrees with the incremental index"
            py = "-"
            py_ratio = "-"
            if length <= args.python_scan_max:
                py_steps = min(args.steps, 20)
                t_py, d_py = time_steps(PythonRescanProposer(args.min_n, args.max_n, args.k), context, future, py_steps, args.k)
                assert d_py == d_inc[:py_steps], "the Python rescan disagrees with the incremental index"
                py, py_ratio = f"{t_py * 1e6:.1f}", f"{t_py / t_inc:.0f}x"
            proposed = sum(len(d) for d in d_inc)
            accepted = _accepted(d_inc, future)
            rate = f"{accepted / proposed:.0%}" if proposed else "-"
            print(f"{length:>8} {kind:>6} {t_inc * 1e6:>10.1f}us {t_np * 1e6:>11.1f}us {t_np / t_inc:>6.0f}x "
                  f"{py:>12}us {py_ratio:>8} {rate:>7}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _accepted(drafts: list[list[int]], future: list[int]) -> int:
    pos, total = 0, 0
    for d in drafts:
        a = 0
        while a < len(d) and d[a] == future[pos + a]:
            a += 1
        total += a
        pos += a + 1
    return total


if __name__ == "__main__":
    main()
