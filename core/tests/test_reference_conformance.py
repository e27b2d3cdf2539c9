"""The references pass the conformance kit, and the kit catches wrong providers."""
import pytest
import torch

from kernelplane import Capability, Provider, hookimpl
from kernelplane.reference.attention import ReferenceAttention
from kernelplane.reference.moe import ReferenceMoE
from kernelplane.testing import (ATTENTION_CASES, MOE_CASES, AttentionConformance, KVQuantizerConformance, MoEConformance,
                                 ProposerConformance, check_attention, check_moe)


class TestReferenceAttention(AttentionConformance):
    provider_name = "reference"


class TestReferenceAttentionInt8Cache(AttentionConformance):
    provider_name = "reference"
    kv_cache_format = "int8"
    dtypes = ("float32",)


class TestRoundToNearest(KVQuantizerConformance):
    provider_name = "rtn"
    formats = {"int8": 0.02, "fp8": 0.08}


class TestReferenceMoE(MoEConformance):
    provider_name = "reference"


class TestNullProposer(ProposerConformance):
    provider_name = "none"
    method = "none"


class _NoCausalMask(ReferenceAttention):
    """Deliberately wrong: lets queries see future keys."""

    def __init__(self, request):
        super().__init__(request.model_copy(update={"causal": False}))


class _WrongScale(ReferenceAttention):
    def __init__(self, request):
        super().__init__(request)
        self.scale *= 1.1


class _IgnoresRoutingWeights(ReferenceMoE):
    def forward(self, hidden, w13, w2, topk_weights, topk_ids):
        return super().forward(hidden, w13, w2, torch.ones_like(topk_weights), topk_ids)


class _WrongPlugin:
    @hookimpl
    def kernelplane_attention_backends(self):
        return [Provider("no_causal", Capability.ATTENTION, 1, lambda r, h: _NoCausalMask(r)),
                Provider("wrong_scale", Capability.ATTENTION, 1, lambda r, h: _WrongScale(r))]

    @hookimpl
    def kernelplane_moe_kernels(self):
        return [Provider("unweighted", Capability.MOE, 1, lambda r, h: _IgnoresRoutingWeights(r))]


def _case(name):
    return next(c for c in ATTENTION_CASES if c.name == name)


@pytest.mark.parametrize("provider, case", [
    ("no_causal", "prefill_varlen"), ("no_causal", "multi_token_decode_gqa4"),
    ("wrong_scale", "decode_gqa2"), ("wrong_scale", "prefill_varlen"),
])
def test_kit_rejects_wrong_attention(fresh_registry, provider, case):
    fresh_registry.register(_WrongPlugin(), name="wrong")
    with pytest.raises(AssertionError, match="relative error"):
        check_attention(provider, _case(case), "float32")


def test_kit_rejects_wrong_moe(fresh_registry):
    fresh_registry.register(_WrongPlugin(), name="wrong")
    with pytest.raises(AssertionError, match="relative error"):
        check_moe("unweighted", MOE_CASES[1], "float32")


def test_kit_accepts_the_same_provider_registered_by_a_plugin(fresh_registry):
    class Good:
        @hookimpl
        def kernelplane_attention_backends(self):
            return [Provider("copy_of_reference", Capability.ATTENTION, 1, lambda r, h: ReferenceAttention(r))]

    fresh_registry.register(Good(), name="good")
    for case in ATTENTION_CASES:
        check_attention("copy_of_reference", case, "bfloat16")
