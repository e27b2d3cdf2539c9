"""Plugin discovery: the core's built-ins plus every entry point in group
``kernelplane.plugins``. A plugin that fails to import is recorded with its
error and skipped; it never takes the others down."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import pluggy

from . import hookspecs
from .capabilities import Capability
from .provider import Provider

try:
    from importlib.metadata import entry_points
except ImportError:  # pragma: no cover
    from importlib_metadata import entry_points

log = logging.getLogger("kernelplane")

ENTRY_POINT_GROUP = "kernelplane.plugins"

_HOOK_FOR = {
    Capability.ATTENTION: "kernelplane_attention_backends",
    Capability.KV_QUANTIZER: "kernelplane_kv_quantizers",
    Capability.MOE: "kernelplane_moe_kernels",
    Capability.SPEC_PROPOSER: "kernelplane_spec_proposers",
}


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)
    error: Optional[str] = None

    def as_dict(self) -> dict:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "hooks": self.hooks, "error": self.error}


class Registry:
    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        from . import builtins

        self.register(builtins, name="kernelplane.builtins", distribution="kernelplane-core", version=_core_version())
        if load_entry_points:
            self._load_entry_points()

    def register(self, plugin: Any, name: str, distribution: str = "", version: str = "") -> PluginInfo:
        """Register an in-process plugin (tests, notebooks); entry points use this too."""
        info = PluginInfo(name, distribution or name, version)
        try:
            self.pm.register(plugin, name=name)
            info.hooks = sorted(h.name for h in (self.pm.get_hookcallers(plugin) or []))
        except Exception as exc:
            info.error = f"{type(exc).__name__}: {exc}"
            log.warning("kernelplane plugin %s could not be registered: %s", name, info.error)
        self.plugins.append(info)
        return info

    def _load_entry_points(self) -> None:
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else ep.value
            version = dist.version if dist is not None else ""
            if self.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                info = PluginInfo(ep.name, dist_name, version, error=f"import failed: {type(exc).__name__}: {exc}")
                log.warning("kernelplane plugin %s (%s) failed to import: %s", ep.name, dist_name, exc)
                self.plugins.append(info)
                continue
            self.register(plugin, name=ep.name, distribution=dist_name, version=version)

    def providers(self, capability: Capability) -> list[Provider]:
        """Every provider of a capability, tagged with the distribution that offers it."""
        hook = getattr(self.pm.hook, _HOOK_FOR[capability])
        found: list[Provider] = []
        for impl in hook.get_hookimpls():
            info = next((p for p in self.plugins if p.name == impl.plugin_name), None)
            try:
                result = impl.function() or []
            except Exception as exc:
                log.warning("kernelplane plugin %s: %s() raised %s: %s", impl.plugin_name, hook.name, type(exc).__name__, exc)
                if info is not None and not info.error:
                    info.error = f"{hook.name}() raised {type(exc).__name__}: {exc}"
                continue
            for p in result:
                if not isinstance(p, Provider) or p.capability != capability:
                    log.warning("kernelplane plugin %s returned an invalid provider from %s: %r", impl.plugin_name, hook.name, p)
                    continue
                found.append(_tag(p, info))
        return found

    def hardware_facts(self, hardware) -> dict:
        merged: dict = {}
        for impl in self.pm.hook.kernelplane_hardware_facts.get_hookimpls():
            try:
                facts = impl.function(hardware=hardware)
            except Exception as exc:
                log.warning("kernelplane plugin %s: hardware facts raised %s", impl.plugin_name, exc)
                continue
            if facts:
                merged.update(facts)
        return merged


def _tag(p: Provider, info: Optional[PluginInfo]) -> Provider:
    if info is None or p.plugin:
        return p
    import dataclasses

    return dataclasses.replace(p, plugin=info.distribution, plugin_version=info.version)


def _core_version() -> str:
    try:
        from importlib.metadata import version

        return version("kernelplane-core")
    except Exception:
        return "dev"


_registry: Optional[Registry] = None
_lock = threading.Lock()


def get_registry() -> Registry:
    global _registry
    with _lock:
        if _registry is None:
            _registry = Registry()
        return _registry


def reset_registry(registry: Optional[Registry] = None) -> None:
    """Drop the cached registry (tests), or install a given one."""
    global _registry
    with _lock:
        _registry = registry
