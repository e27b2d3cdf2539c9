"""The provider as selection sees it: discovery, refusals with reasons, priority."""
import subprocess
import sys

import pytest

from kernelplane import AttentionRequest, SelectionError, override_hardware, select
from kernelplane_attention_triton.plugin import PRIORITY, PROVIDER_NAME

REQ = AttentionRequest(num_heads=8, num_kv_heads=2, head_dim=128, dtype="bfloat16")


def verdict(request, **hardware):
    with override_hardware(**hardware):
        sel = select("attention", request, build=False)
    return next(c for c in sel.candidates if c.provider.name == PROVIDER_NAME).verdict


def test_discovered_through_its_entry_point(fresh_registry):
    info = next(p for p in fresh_registry.plugins if p.name == "attention_triton")
    assert info.distribution == "kernelplane-attention-triton" and info.error is None
    assert info.hooks == ["kernelplane_attention_backends"]


def test_refused_on_cpu_without_the_interpreter(fresh_registry):
    v = verdict(REQ, device_type="cpu", triton_mode="unavailable")
    assert not v.ok and "TRITON_INTERPRET=1" in v.reason
    with override_hardware(device_type="cpu", triton_mode="unavailable"):
        assert select("attention", REQ).chosen.name != PROVIDER_NAME
        with pytest.raises(SelectionError, match="TRITON_INTERPRET=1"):
            select("attention", REQ, override=PROVIDER_NAME)


def test_chosen_by_priority_when_triton_can_run(fresh_registry):
    with override_hardware(device_type="cpu", triton_mode="interpreter"):
        sel = select("attention", REQ)
    assert sel.chosen.name == PROVIDER_NAME and sel.chosen.priority == PRIORITY
    assert sel.chosen.plugin == "kernelplane-attention-triton"
    ranked = [c.provider.name for c in sel.candidates]
    assert ranked.index(PROVIDER_NAME) < ranked.index("reference")
    assert type(sel.implementation).__name__ == "TritonPagedAttention"


def test_also_chosen_on_a_gpu(fresh_registry):
    v = verdict(REQ, device_type="cuda", triton_mode="compiled", triton_version="3.6.0",
                compute_capability=(9, 0), sm_count=132)
    assert v.ok, v.reason


@pytest.mark.parametrize("request_fields, reason", [
    (dict(kind="mla", num_kv_heads=1, head_dim=576, head_dim_v=512), "attention kind 'mla' not supported"),
    (dict(kv_cache_format="int8"), "KV-cache format 'int8' not supported"),
    (dict(head_dim=512), "head_dim 512 not supported"),
    (dict(head_dim_v=320), "head_dim_v 320 not supported"),
    (dict(block_size=24), "block_size 24 not supported"),
])
def test_refuses_what_it_cannot_run_with_a_reason(fresh_registry, request_fields, reason):
    request = REQ.model_copy(update=request_fields)
    v = verdict(request, device_type="cpu", triton_mode="interpreter")
    assert not v.ok and reason in v.reason


def test_loading_the_plugin_imports_no_triton():
    code = ("import sys, kernelplane_attention_triton.plugin as p; p.kernelplane_attention_backends(); "
            "print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
