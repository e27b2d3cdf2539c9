"""Registers the ``sdpa`` attention provider with kernelplane."""
from kernelplane import Capability, Provider, Requirements, hookimpl


def _build(request, hardware):
    from .backend import SdpaAttention  # imported only when chosen: keeps discovery fast

    return SdpaAttention(request)


@hookimpl
def kernelplane_attention_backends():
    return [Provider(
        name="sdpa",
        capability=Capability.ATTENTION,
        priority=10,
        factory=_build,
        requirements=Requirements(kinds=["mha"], kv_cache_formats=["float32", "float16", "bfloat16"]),
        description="example plugin: gathers pages, then torch scaled_dot_product_attention",
    )]
