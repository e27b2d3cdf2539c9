"""The attention provider as selection sees it."""
import pytest

from kernelplane import AttentionRequest, SelectionError, override_hardware, select
from kernelplane_quant_turboquant.plugin import ATTENTION_PRIORITY, PROVIDER_NAME

REQ = AttentionRequest(num_heads=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", kv_cache_format="turboquant3")


def verdict(request, **hardware):
    with override_hardware(**hardware):
        sel = select("attention", request, build=False)
    return next(c for c in sel.candidates if c.provider.name == PROVIDER_NAME).verdict


def test_discovered_through_its_entry_point(fresh_registry):
    info = next(p for p in fresh_registry.plugins if p.name == "quant_turboquant")
    assert info.distribution == "kernelplane-quant-turboquant" and info.error is None
    assert info.hooks == ["kernelplane_attention_backends", "kernelplane_kv_quantizers"]


def test_chosen_for_turboquant_pages_when_triton_runs(fresh_registry):
    with override_hardware(device_type="cpu", triton_mode="interpreter"):
        sel = select("attention", REQ)
    assert sel.chosen.name == PROVIDER_NAME and sel.chosen.priority == ATTENTION_PRIORITY
    assert type(sel.implementation).__name__ == "TurboQuantAttention"
    assert verdict(REQ, device_type="cuda", triton_mode="compiled", triton_version="3.6.0",
                   compute_capability=(9, 0), sm_count=132).ok


def test_without_triton_the_reference_dequantizes(fresh_registry):
    v = verdict(REQ, device_type="cpu", triton_mode="unavailable")
    assert not v.ok and "TRITON_INTERPRET=1" in v.reason
    with override_hardware(device_type="cpu", triton_mode="unavailable"):
        assert select("attention", REQ).chosen.name == "reference"
        with pytest.raises(SelectionError, match="TRITON_INTERPRET=1"):
            select("attention", REQ, override=PROVIDER_NAME)


@pytest.mark.parametrize("fields, reason", [
    (dict(kv_cache_format="bfloat16"), "KV-cache format 'bfloat16' not supported"),
    (dict(head_dim=96), "head_dim 96 not supported by the kernel"),
    (dict(num_heads=128, num_kv_heads=1), "128 query heads per KV head not supported"),
    (dict(kind="mla", num_kv_heads=1, num_heads=16, head_dim=576, head_dim_v=512), "attention kind 'mla' not supported"),
])
def test_refuses_with_a_reason(fresh_registry, fields, reason):
    v = verdict(REQ.model_copy(update=fields), device_type="cpu", triton_mode="interpreter")
    assert not v.ok and reason in v.reason
