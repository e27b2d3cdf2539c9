"""Conformance kit: the shared correctness suite any provider must pass.

Two ways to use it in a plugin's own CI:

1. Subclass a suite class in a test file; pytest collects its tests::

       from kernelplane.testing import AttentionConformance

       class TestMyBackend(AttentionConformance):
           provider_name = "mine"        # the Provider.name to check

2. Run the bundled suite against any installed provider, no code needed::

       pytest --pyargs kernelplane.testing.suite --kernelplane-provider attention=mine

Each case draws fresh random inputs, builds the provider through the normal
selection path (as an explicit override), and compares with the core's
pure-PyTorch reference at a tolerance that fits the dtype. A case whose
request the provider refuses is skipped with the provider's own reason.
"""
from .attention import ATTENTION_CASES, AttentionCase, AttentionConformance, check_attention
from .kv_quant import KVQuantizerConformance, check_kv_quantizer
from .moe import MOE_CASES, MoEConformance, check_moe
from .proposer import ProposerConformance, check_proposer

__all__ = [
    "ATTENTION_CASES", "AttentionCase", "AttentionConformance", "check_attention",
    "KVQuantizerConformance", "check_kv_quantizer", "MOE_CASES", "MoEConformance", "check_moe",
    "ProposerConformance", "check_proposer",
]
