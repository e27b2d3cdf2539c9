"""kernelplane: a plugin framework for LLM-inference kernels.

Public API for plugin authors: ``hookimpl``, ``Provider``, ``Requirements``,
``Verdict``, ``Capability``, the request types, and the protocols in
``kernelplane.interfaces``. For users: ``select`` and ``explain``.
"""
from .capabilities import AttentionRequest, Capability, KVQuantRequest, MoERequest, SpecRequest
from .hardware import Hardware, override_hardware, probe_hardware
from .hookspecs import hookimpl, hookspec
from .kv_cache import AttentionMetadata, KVPages
from .provider import Provider, Requirements, Verdict
from .selection import Selection, SelectionError, rank, select

__version__ = "0.1.0"

__all__ = [
    "AttentionMetadata", "AttentionRequest", "Capability", "Hardware", "KVPages", "KVQuantRequest",
    "MoERequest", "Provider", "Requirements", "Selection", "SelectionError", "SpecRequest", "Verdict",
    "hookimpl", "hookspec", "override_hardware", "probe_hardware", "rank", "select",
]
