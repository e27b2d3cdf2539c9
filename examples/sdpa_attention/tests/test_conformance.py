from kernelplane.testing import AttentionConformance


class TestSdpa(AttentionConformance):
    provider_name = "sdpa"
