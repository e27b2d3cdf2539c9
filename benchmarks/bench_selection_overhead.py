"""Per-call cost of a selected backend vs calling the same code directly.

Selection runs once; afterwards the engine holds the implementation object
and calls its method. This measures that claim: the selected object's call
against a direct call of an instance built by hand, and against a hook
dispatch per call (what a naive plugin host would do on every token).
"""
import platform
import time
from datetime import date

import torch

from kernelplane import AttentionRequest, Capability, Provider, hookimpl, select
from kernelplane.registry import get_registry


class Scale:
    def __init__(self, request):
        self.k = 2

    def forward(self, x):
        return x * self.k if isinstance(x, int) else x


class BenchPlugin:
    @hookimpl
    def kernelplane_attention_backends(self):
        return [Provider("bench_scale", Capability.ATTENTION, 1000, lambda r, h: Scale(r))]


def per_call_ns(fn, n=1_000_000, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn(3)
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def main():
    registry = get_registry()
    registry.register(BenchPlugin(), name="bench")
    request = AttentionRequest(num_heads=8, num_kv_heads=2, head_dim=64)
    selected = select("attention", request).implementation
    direct = Scale(request)
    hook = registry.pm.hook.kernelplane_attention_backends

    def dispatch_per_call(x):  # the anti-pattern: ask the plugins every call
        return hook()[0]

    loop = per_call_ns(lambda x: None)
    t_direct = per_call_ns(direct.forward) - loop
    t_selected = per_call_ns(selected.forward) - loop
    t_dispatch = per_call_ns(dispatch_per_call, n=100_000) - loop
    print(f"# selection overhead, {platform.processor() or platform.machine()}, torch {torch.__version__}, {date.today()}")
    print("| call | ns/call (loop cost removed) | ratio to direct |")
    print("|---|---|---|")
    for name, t in [("direct instance.forward", t_direct), ("selected implementation.forward", t_selected),
                    ("pluggy hook call per call (not used)", t_dispatch)]:
        print(f"| {name} | {t:.1f} | {t / t_direct:.2f}x |")


if __name__ == "__main__":
    main()
