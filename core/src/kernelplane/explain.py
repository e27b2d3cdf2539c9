"""The same selection tables for Python, the CLI and the server."""
from __future__ import annotations

from typing import Any, Optional

from .capabilities import AttentionRequest, Capability, KVQuantRequest, MoERequest, SpecRequest
from .hardware import Hardware, probe_hardware
from .registry import get_registry
from .selection import Selection, SelectionError, select

# What `kernelplane explain` asks for when no model is given: the embedded
# default model's attention (SmolLM2-135M: 9 query heads, 3 KV heads, dim 64).
DEFAULT_REQUESTS: dict[Capability, Any] = {
    Capability.ATTENTION: AttentionRequest(num_heads=9, num_kv_heads=3, head_dim=64, dtype="bfloat16"),
    Capability.KV_QUANTIZER: KVQuantRequest(format="int8", num_kv_heads=3, head_dim=64),
    Capability.MOE: MoERequest(num_experts=8, top_k=2, hidden_size=1024, intermediate_size=512),
    Capability.SPEC_PROPOSER: SpecRequest(method="none"),
}


def explain(requests: Optional[dict[Capability, Any]] = None, hardware: Optional[Hardware] = None,
            overrides: Optional[dict[Capability, str]] = None) -> dict[Capability, Selection]:
    """Ranked candidates per capability, without building anything.

    A capability whose selection fails still appears, with every candidate
    refused and the error's table.
    """
    hardware = hardware or probe_hardware()
    requests = {**DEFAULT_REQUESTS, **(requests or {})}
    overrides = overrides or {}
    out: dict[Capability, Selection] = {}
    for cap, req in requests.items():
        try:
            out[cap] = select(cap, req, override=overrides.get(cap), hardware=hardware, build=False)
        except SelectionError as exc:
            out[cap] = exc.selection
    return out


def plugin_report() -> dict:
    """Installed plugins and the providers each one offers (``kernelplane plugins``)."""
    registry = get_registry()
    providers: dict[str, list[dict]] = {}
    for cap in Capability:
        for p in registry.providers(cap):
            providers.setdefault(p.plugin, []).append({
                "name": p.name, "capability": cap.value, "priority": p.priority,
                "requirements": p.requirements.as_dict(), "description": p.description,
            })
    plugins = []
    for info in registry.plugins:
        d = info.as_dict()
        d["providers"] = providers.get(info.distribution, [])
        plugins.append(d)
    return {"hardware": probe_hardware().model_dump(), "plugins": plugins}
