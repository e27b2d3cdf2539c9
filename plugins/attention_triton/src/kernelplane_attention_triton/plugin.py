"""Registers the ``triton`` attention provider with kernelplane.

Only descriptors live here: Triton and the kernels are imported inside the
factory, so listing plugins stays fast and never fails without Triton.
"""
from __future__ import annotations

from kernelplane import AttentionRequest, Capability, Hardware, Provider, Requirements, Verdict, hookimpl
from kernelplane.capabilities import PLAIN_KV_FORMATS

PROVIDER_NAME = "triton"
PRIORITY = 50  # above the reference (0)
MAX_HEAD_DIM = 256  # one head's K or V row must fit one tile


def supports(request: AttentionRequest, hardware: Hardware) -> Verdict:
    """Conditions the declarative requirements cannot state."""
    problems = []
    for what, dim in (("head_dim", request.head_dim), ("head_dim_v", request.v_dim)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            problems.append(f"{what} {dim} not supported (1..{MAX_HEAD_DIM})")
    if request.block_size & (request.block_size - 1):
        problems.append(f"block_size {request.block_size} not supported (a power of two)")
    if problems:
        return Verdict.no("; ".join(problems))
    return Verdict.yes(f"Triton ({hardware.triton_mode})")


def _build(request: AttentionRequest, hardware: Hardware):
    from .backend import TritonPagedAttention  # imports triton: only when chosen

    return TritonPagedAttention(request, sm_count=hardware.sm_count)


@hookimpl
def kernelplane_attention_backends():
    return [Provider(
        name=PROVIDER_NAME,
        capability=Capability.ATTENTION,
        priority=PRIORITY,
        factory=_build,
        requirements=Requirements(
            needs_triton=True,
            dtypes=["float16", "bfloat16", "float32"],
            kv_cache_formats=list(PLAIN_KV_FORMATS),
            kinds=["mha"],
        ),
        supports=supports,
        description="Triton paged attention: MHA/GQA/MQA, prefill + chunked prefill + split-KV decode, "
                    "sliding window, head dims up to 256, plain KV formats",
    )]
