"""The core's shared conformance suite, run against this provider."""
from kernelplane.testing import AttentionConformance


class TestTritonConformance(AttentionConformance):
    provider_name = "triton"
    seeds = (0, 1)
