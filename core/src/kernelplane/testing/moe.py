"""MoE conformance: random experts and routing, compared with the reference."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ..capabilities import MoERequest
from ..kv_cache import torch_dtype
from ..moe_routing import select_experts
from ..reference.moe import ReferenceMoE
from ._common import REL_TOL, ConformanceBase, assert_close, build_or_skip, run_each_dtype, test_device


@dataclass(frozen=True)
class MoECase:
    name: str
    tokens: int
    experts: int
    top_k: int
    hidden: int
    intermediate: int

    def __str__(self):
        return self.name


MOE_CASES = [
    MoECase("single_token", 1, 8, 2, 64, 32),
    MoECase("small_batch", 7, 8, 2, 64, 96),
    MoECase("many_experts_top6", 33, 16, 6, 128, 64),
    MoECase("top1", 20, 4, 1, 64, 64),
]


def check_moe(provider_name: str, case: MoECase, dtype: str, seed: int = 0) -> None:
    device = test_device()
    gen = torch.Generator().manual_seed(seed)
    tdtype = torch_dtype(dtype)
    request = MoERequest(num_experts=case.experts, top_k=case.top_k, hidden_size=case.hidden,
                         intermediate_size=case.intermediate, dtype=dtype)
    kernel = build_or_skip("moe", provider_name, request)
    hidden = torch.randn(case.tokens, case.hidden, generator=gen).to(device, tdtype)
    w13 = (torch.randn(case.experts, 2 * case.intermediate, case.hidden, generator=gen) / case.hidden ** 0.5).to(device, tdtype)
    w2 = (torch.randn(case.experts, case.hidden, case.intermediate, generator=gen) / case.intermediate ** 0.5).to(device, tdtype)
    logits = torch.randn(case.tokens, case.experts, generator=gen).to(device)
    weights, ids = select_experts(logits, case.top_k)
    ref = ReferenceMoE(request).forward(hidden.float(), w13.float(), w2.float(), weights, ids)
    out = kernel.forward(hidden, w13, w2, weights, ids)
    assert out.dtype == tdtype, f"output dtype {out.dtype} != {tdtype}"
    assert_close(out.float(), ref, REL_TOL[tdtype], f"{provider_name} on {case} ({dtype})")


class MoEConformance(ConformanceBase):
    capability = "moe"
    dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32")

    @pytest.mark.parametrize("case", MOE_CASES, ids=str)
    def test_matches_reference(self, provider, case):
        run_each_dtype(self.dtypes, lambda dtype: check_moe(provider, case, dtype))
