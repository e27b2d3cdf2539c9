"""The bundled conformance suite, for ``pytest --pyargs kernelplane.testing.suite
--kernelplane-provider attention=NAME``. Capabilities without a named provider
are skipped."""
from kernelplane.testing import AttentionConformance, KVQuantizerConformance, MoEConformance, ProposerConformance


class TestAttention(AttentionConformance):
    pass


class TestMoE(MoEConformance):
    pass


class TestKVQuantizer(KVQuantizerConformance):
    formats = {"int8": 0.02, "fp8": 0.08}


class TestProposer(ProposerConformance):
    method = "none"
