"""The core's own providers, registered through the same hooks as any plugin.

All use priority 0: any installed plugin that can run outranks them.
"""
from __future__ import annotations

from .capabilities import Capability
from .hookspecs import hookimpl
from .provider import Provider, Requirements
from .reference.attention import ReferenceAttention
from .reference.kv_quant import RoundToNearestKVQuantizer, available_formats
from .reference.moe import ReferenceMoE
from .reference.proposer import NullProposer

REFERENCE_PRIORITY = 0


@hookimpl
def kernelplane_attention_backends():
    return [Provider(
        name="reference",
        capability=Capability.ATTENTION,
        priority=REFERENCE_PRIORITY,
        factory=lambda request, hardware: ReferenceAttention(request),
        # Plain formats directly; quantized formats via their quantizer's dequantize().
        requirements=Requirements(kv_cache_formats=None),
        description="pure PyTorch, any device, any shape; dequantizes quantized KV formats",
    )]


@hookimpl
def kernelplane_kv_quantizers():
    return [Provider(
        name="rtn",
        capability=Capability.KV_QUANTIZER,
        priority=REFERENCE_PRIORITY,
        factory=lambda request, hardware: RoundToNearestKVQuantizer(request),
        requirements=Requirements(kv_cache_formats=available_formats()),
        description="round-to-nearest int8/fp8, one scale per token and head",
    )]


@hookimpl
def kernelplane_moe_kernels():
    return [Provider(
        name="reference",
        capability=Capability.MOE,
        priority=REFERENCE_PRIORITY,
        factory=lambda request, hardware: ReferenceMoE(request),
        description="pure PyTorch loop over experts",
    )]


@hookimpl
def kernelplane_spec_proposers():
    return [Provider(
        name="none",
        capability=Capability.SPEC_PROPOSER,
        priority=REFERENCE_PRIORITY,
        factory=lambda request, hardware: NullProposer(request),
        requirements=Requirements(methods=["none"]),
        description="proposes nothing (speculation off)",
    )]

