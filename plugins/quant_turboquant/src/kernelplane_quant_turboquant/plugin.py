"""Registers the TurboQuant KV-cache formats and their attention backend.

Only descriptors live here: the codebooks are computed when a quantizer is
built, and Triton is imported only when the attention backend is built, so
``kernelplane plugins`` stays fast and the plugin loads without Triton.
"""
from __future__ import annotations

from kernelplane import AttentionRequest, Capability, Hardware, KVQuantRequest, Provider, Requirements, Verdict, hookimpl

FORMATS = ["turboquant2", "turboquant3", "turboquant4"]
PROVIDER_NAME = "turboquant"
QUANTIZER_PRIORITY = 50
ATTENTION_PRIORITY = 60  # above plain-format backends: only it reads these pages without dequantizing
KERNEL_HEAD_DIMS = (64, 128, 256)
MAX_GROUP = 64  # query heads per KV head that one program holds


def quantizer_supports(request: KVQuantRequest, hardware: Hardware) -> Verdict:
    for what, dim in (("head_dim", request.head_dim), ("head_dim_v", request.v_dim)):
        if dim < 32 or dim % 32:
            return Verdict.no(f"{what} {dim} not supported (a multiple of 32)")
    return Verdict.yes()


def attention_supports(request: AttentionRequest, hardware: Hardware) -> Verdict:
    problems = []
    for what, dim in (("head_dim", request.head_dim), ("head_dim_v", request.v_dim)):
        if dim not in KERNEL_HEAD_DIMS:
            problems.append(f"{what} {dim} not supported by the kernel (supports {', '.join(map(str, KERNEL_HEAD_DIMS))})")
    group = request.num_heads // request.num_kv_heads
    if group > MAX_GROUP:
        problems.append(f"{group} query heads per KV head not supported (at most {MAX_GROUP})")
    if problems:
        return Verdict.no("; ".join(problems))
    return Verdict.yes(f"Triton ({hardware.triton_mode})")


def _build_quantizer(request: KVQuantRequest, hardware: Hardware):
    from .quantizer import TurboQuantKVQuantizer

    return TurboQuantKVQuantizer(request)


def _build_attention(request: AttentionRequest, hardware: Hardware):
    from .backend import TurboQuantAttention  # imports triton: only when chosen

    return TurboQuantAttention(request, sm_count=hardware.sm_count)


@hookimpl
def kernelplane_kv_quantizers():
    return [Provider(
        name=PROVIDER_NAME,
        capability=Capability.KV_QUANTIZER,
        priority=QUANTIZER_PRIORITY,
        factory=_build_quantizer,
        requirements=Requirements(kv_cache_formats=FORMATS, kinds=["mha"]),
        supports=quantizer_supports,
        description="TurboQuant: per-vector norm + 2/3/4-bit Lloyd-Max codes after a random rotation, no calibration",
    )]


@hookimpl
def kernelplane_attention_backends():
    return [Provider(
        name=PROVIDER_NAME,
        capability=Capability.ATTENTION,
        priority=ATTENTION_PRIORITY,
        factory=_build_attention,
        requirements=Requirements(
            needs_triton=True,
            dtypes=["float16", "bfloat16", "float32"],
            kv_cache_formats=FORMATS,
            kinds=["mha"],
        ),
        supports=attention_supports,
        description="Triton attention reading TurboQuant codes + norms in place (rotated query, split-KV decode, "
                    "GQA, prefill, sliding window)",
    )]
