"""The elementwise pieces of a decoder layer, eager or fused.

Eager PyTorch runs each of these as several kernels (RMSNorm alone is about
seven). A small model's decode step is then a thousand tiny kernels whose
launch latency, not arithmetic, sets the step time, even inside a CUDA graph.
``compiled_ops()`` asks torch.compile to fuse each function into one kernel;
the model swaps them in on GPUs and keeps the eager ones elsewhere (CPU
compilation is slow to start and gains little there).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("kernelplane")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in float32, scale in the model's dtype (as Hugging Face does).
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + delta, its RMSNorm): the residual add and the next norm in one pass."""
    residual = residual + delta
    return residual, rms_norm(residual, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [T, heads, head_dim]; cos, sin [T, 1, head_dim // 2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation on the fused gate/up projection [T, 2 * intermediate]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class PointwiseOps:
    add_rms_norm: Callable = add_rms_norm
    apply_rope: Callable = apply_rope
    silu_mul: Callable = silu_mul
    fused: bool = False


EAGER_OPS = PointwiseOps()


def compiled_ops(device: str, dtype: torch.dtype, hidden_size: int, head_dim: int) -> PointwiseOps:
    """The same functions compiled by torch.compile, checked and warmed up on
    ``device``; the eager ones (with a warning) if compilation fails here."""
    def compile_one(fn):
        # dynamic: one compiled kernel serves every token count (decode batches, prefill chunks).
        return torch.compile(fn, dynamic=True, fullgraph=True)

    # Compile afresh in every process. On an H100 (torch 2.11), when a later
    # process loaded these kernels from inductor's on-disk caches (filled by
    # the first process), TurboQuant engines crashed with illegal memory
    # accesses or gave garbage (7 of 9 processes; the other 2 gave text that
    # differed from a fresh compile's); with a fresh cache directory they never did.
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = False
    if hasattr(torch._functorch.config, "enable_autograd_cache"):
        torch._functorch.config.enable_autograd_cache = False

    ops = PointwiseOps(*(compile_one(f) for f in (add_rms_norm, apply_rope, silu_mul)), fused=True)
    try:
        for tokens in (1, 3):  # 1 is specialized by torch.compile; 3 covers every other count
            x = torch.randn(tokens, hidden_size, device=device, dtype=dtype)
            w = torch.randn(hidden_size, device=device, dtype=dtype)
            qk = torch.randn(tokens, 4, head_dim, device=device, dtype=dtype)
            cs = torch.randn(tokens, 1, head_dim // 2, device=device, dtype=dtype)
            for got, want in [(ops.add_rms_norm(x, x, w, 1e-5)[1], add_rms_norm(x, x, w, 1e-5)[1]),
                              (ops.apply_rope(qk, cs, cs), apply_rope(qk, cs, cs)),
                              (ops.silu_mul(torch.cat((x, x), -1)), silu_mul(torch.cat((x, x), -1)))]:
                torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    except Exception as exc:  # a missing compiler, an unsupported GPU: run unfused rather than not at all
        log.warning("torch.compile of the pointwise ops failed here (%s: %s); running them eagerly",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return EAGER_OPS
    return ops
