"""Versions of the Gluon 2-bit decode kernel against each other, in one process, on the GPU.

A change to ``gluon_decode`` moves the backend's decode time by a few percent,
less than the spread between two processes (or two machines). This script
times several versions in one process on the same pages, in alternating
rounds (each version's figure is its minimum over the rounds):

- ``this``: the checkout's kernel and backend with their defaults;
- ``--variant LABEL:SETTING[,SETTING]``, each setting one of
  ``file=PATH`` (another version of ``gluon_decode.py``, an earlier commit's
  say: ``git show HEAD~1:plugins/.../gluon_decode.py``, run through this
  checkout's backend), ``NAME=VALUE`` (a constexpr parameter of the kernel:
  ``RESCALE_SLACK=4.0``), or ``backend.NAME=VALUE`` /
  ``gluon_decode.NAME=VALUE`` (a module constant: ``gluon_decode.ROUNDS=1``).

Every version is first checked against the reference attention on written
pages (``--timing-only LABEL`` exempts a version that is wrong on purpose: a bound
on what a change not yet built could gain); the timing is the backend's whole forward (query rotation, decode
kernel, split combine) in CUDA-graph replays, as in
``bench_turboquant_gluon.py``. The table prints SDPA on bfloat16 K/V (the
peer) and each version's share of the copy bandwidth measured in the same run.

    python benchmarks/ab_turboquant_gluon.py --variant slack4:RESCALE_SLACK=4.0 \\
        --variant old:file=/tmp/gluon_decode_old.py,backend.ROTATE_CHUNK=32
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = [(16, 32768), (4, 32768), (1, 32768), (16, 131072), (16, 4096), (1, 4096)]


class _Overridden:
    """A Gluon kernel whose launches add constexpr keyword arguments."""

    def __init__(self, kernel, constexprs: dict):
        self.kernel, self.constexprs = kernel, constexprs

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **{**kwargs, **self.constexprs})


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def _load_module(label: str, path: str):
    spec = importlib.util.spec_from_file_location(f"gluon_decode_{label}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def versions_from(args) -> dict:
    """label -> (gluon_decode module, constexpr overrides, module constants to set)."""
    from kernelplane_quant_turboquant import gluon_decode

    out = {"this": (gluon_decode, {}, {})}
    for item in args.variant:
        label, settings = item.split(":", 1)
        module, constexprs, constants = gluon_decode, {}, {}
        for name, value in (setting.split("=", 1) for setting in settings.split(",")):
            if name == "file":
                module = _load_module(label, value)
            else:
                (constants if "." in name else constexprs)[name] = _parse_value(value)
        out[label] = (module, constexprs, constants)
    return out


@contextlib.contextmanager
def using(version):
    """The backend launching ``version``'s kernel, its module constants set, while inside."""
    from kernelplane_quant_turboquant import backend

    module, constexprs, constants = version
    modules = {"backend": backend, "gluon_decode": module}
    targets = {name: (modules[name.split(".")[0]], name.split(".")[1]) for name in constants}
    saved_constants = {name: getattr(owner, attr, None) for name, (owner, attr) in targets.items()}
    saved, saved_kernel = backend.gluon_decode, module.tq2_decode_gluon
    backend.gluon_decode = module
    if constexprs:
        module.tq2_decode_gluon = _Overridden(saved_kernel, constexprs)
    for name, (owner, attr) in targets.items():
        setattr(owner, attr, constants[name])
    try:
        yield
    finally:
        backend.gluon_decode, module.tq2_decode_gluon = saved, saved_kernel
        for name, (owner, attr) in targets.items():
            setattr(owner, attr, saved_constants[name])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:SETTING[,SETTING]")
    ap.add_argument("--timing-only", action="append", default=[], metavar="LABEL",
                    help="a version whose outputs need not match the reference (a what-if bound)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(f"{b}x{n}" for b, n in SHAPES),
                    help="decode batches as BxL, comma-separated (default: %(default)s)")
    args = ap.parse_args()
    import bench_turboquant as bt
    from bench_turboquant_gluon import gluon_setup, written_decode_case

    device, gen = "cuda", torch.Generator().manual_seed(0)
    setup = gluon_setup(bt)
    if setup is None:
        return 1
    quantizer, backend, request = setup
    versions = versions_from(args)
    hq, hkv, dim = bt.HQ, bt.HKV, bt.D
    for label, (module, constexprs, constants) in versions.items():
        print(f"  {label}: {module.__file__}" + "".join(f" with {d}" for d in (constexprs, constants) if d))

    pages, meta, query, ref = written_decode_case(bt, quantizer, request, device, gen)
    errors = {}
    for label, version in versions.items():
        with using(version):
            errors[label] = bt.rel_err(backend.forward(query, pages, meta, backend.plan(meta, bits=2, gluon=True)), ref)
    print("relative error against the reference: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    del pages
    if max(e for label, e in errors.items() if label not in args.timing_only) > 5e-3:
        print("a version disagrees with the reference: no timing")
        return 1

    copy_bw = bt.copy_bandwidth(device)["copy"]
    per_token = quantizer.bytes_per_token(hkv, dim, dim)
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s; min of {args.rounds} alternating rounds, µs")
    labels = list(versions)
    print("| B | L | SDPA bf16 | " + " | ".join(labels) + " | " + " | ".join(f"{l} / this" for l in labels[1:])
          + " | this vs SDPA | " + " | ".join(f"{l} roof" for l in labels) + " |")
    print("|---|---|---|" + "---|" * (2 * len(labels) + len(labels) - 1 + 1))
    for batch, ctx in ([int(x) for x in shape.split("x")] for shape in args.shapes.split(",")):
        sdpa = bt.time_sdpa(batch, ctx, device)
        metas, blocks = bt.decode_sets(batch, ctx, per_token, device, gen)
        pages = bt.random_tq_pool(quantizer, blocks, device, gen)
        q = torch.randn(batch, hq, dim, device=device, dtype=torch.bfloat16)
        best = {label: float("inf") for label in labels}
        for _ in range(args.rounds):
            for label in labels:
                with using(versions[label]):  # plans inside: a variant may change them
                    plans = [backend.plan(m, bits=2, gluon=True) for m in metas]
                    t = bt.time_graph([lambda m=m, p=p: backend.forward(q, pages, m, plan=p)
                                       for m, p in zip(metas, plans)])
                best[label] = min(best[label], t)
        nbytes = batch * ctx * per_token
        print(f"| {batch} | {ctx} | {sdpa * 1e6:.1f} | " + " | ".join(f"{best[l] * 1e6:.1f}" for l in labels) + " | "
              + " | ".join(f"{best[l] / best['this']:.3f}" for l in labels[1:]) + f" | {sdpa / best['this']:.2f}x | "
              + " | ".join(f"{nbytes / best[l] / copy_bw:.0%}" for l in labels) + " |", flush=True)
        del pages
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
