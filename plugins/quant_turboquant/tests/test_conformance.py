"""The core's shared attention suite on TurboQuant pages: the kernel against
the reference, which dequantizes the same pages. The suite's MLA case is left
out: these formats store separate K and V (the quantizer refuses MLA)."""
import pytest

from kernelplane.testing import AttentionConformance
from kernelplane.testing.attention import ATTENTION_CASES, check_attention

MHA_CASES = [c for c in ATTENTION_CASES if c.kind == "mha"]


class _TurboQuantConformance(AttentionConformance):
    provider_name = "turboquant"

    @pytest.mark.parametrize("case", MHA_CASES, ids=str)
    def test_matches_reference(self, provider, case):
        for dtype in self.dtypes:
            for seed in self.seeds:
                check_attention(provider, case, dtype, self.kv_cache_format, seed, self.tolerance)


class TestTurboQuant2(_TurboQuantConformance):
    kv_cache_format = "turboquant2"
    dtypes = ("float16",)


class TestTurboQuant3(_TurboQuantConformance):
    kv_cache_format = "turboquant3"
    dtypes = ("bfloat16", "float32")


class TestTurboQuant4(_TurboQuantConformance):
    kv_cache_format = "turboquant4"
    dtypes = ("bfloat16",)
