"""Provider descriptors: what a plugin offers, and when it can run.

A provider states its requirements as plain data (``Requirements``); the core
checks those and reports every failed one. A provider may add a ``supports``
callback for conditions that data cannot express.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from .capabilities import Capability
from .hardware import Hardware


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str

    @classmethod
    def yes(cls, reason: str = "supported") -> "Verdict":
        return cls(True, reason)

    @classmethod
    def no(cls, reason: str) -> "Verdict":
        return cls(False, reason)

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class Requirements:
    """Declarative facts; ``None`` means "no constraint".

    Request fields are matched by name: ``dtypes`` against ``request.dtype``,
    ``head_dims`` against ``request.head_dim``, ``kv_cache_formats`` against
    the request's resolved KV format, ``kinds`` against ``request.kind``.
    """

    device_types: Optional[Sequence[str]] = None
    min_compute_capability: Optional[tuple[int, int]] = None
    max_compute_capability: Optional[tuple[int, int]] = None
    needs_triton: bool = False
    python_modules: Sequence[str] = ()
    dtypes: Optional[Sequence[str]] = None
    head_dims: Optional[Sequence[int]] = None
    kv_cache_formats: Optional[Sequence[str]] = None
    kinds: Optional[Sequence[str]] = None
    block_sizes: Optional[Sequence[int]] = None
    methods: Optional[Sequence[str]] = None

    def check(self, request: Any, hardware: Hardware) -> list[str]:
        """Every unmet requirement, as a human reason (empty list: all met)."""
        problems: list[str] = []
        if self.device_types is not None and hardware.device_type not in self.device_types:
            if not hardware.is_gpu and any(d in ("cuda", "rocm") for d in self.device_types):
                problems.append(f"no GPU: needs {'/'.join(self.device_types)}, this machine is {hardware.device_type}")
            else:
                problems.append(f"device {hardware.device_type} not supported (needs {'/'.join(self.device_types)})")
        cc = hardware.compute_capability
        if self.min_compute_capability and (cc is None or cc < self.min_compute_capability):
            have = "sm_%d%d" % cc if cc else "no compute capability"
            problems.append(f"compute capability {have} < required sm_%d%d" % self.min_compute_capability)
        if self.max_compute_capability and cc is not None and cc > self.max_compute_capability:
            problems.append("compute capability sm_%d%d > supported sm_%d%d" % (cc + self.max_compute_capability))
        if self.needs_triton:
            if hardware.triton_version is None:
                problems.append("triton is not installed")
            elif hardware.triton_mode == "unavailable":
                problems.append("no GPU: Triton can only interpret here (set TRITON_INTERPRET=1 to use the interpreter)")
        for module in self.python_modules:
            import importlib.util

            if importlib.util.find_spec(module) is None:
                problems.append(f"python module '{module}' is not installed")
        problems += _match(self.dtypes, getattr(request, "dtype", None), "dtype")
        problems += _match(self.head_dims, getattr(request, "head_dim", None), "head_dim")
        if self.head_dims is not None and getattr(request, "head_dim_v", None):
            problems += _match(self.head_dims, request.head_dim_v, "head_dim_v")
        fmt = getattr(request, "resolved_kv_format", None) or getattr(request, "format", None)
        problems += _match(self.kv_cache_formats, fmt, "KV-cache format")
        problems += _match(self.kinds, getattr(request, "kind", None), "attention kind")
        problems += _match(self.block_sizes, getattr(request, "block_size", None), "block_size")
        problems += _match(self.methods, getattr(request, "method", None), "method")
        return problems

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dataclasses.asdict(self).items() if v not in (None, (), False)}


def _match(allowed, value, what: str) -> list[str]:
    if allowed is None or value is None or value in allowed:
        return []
    return [f"{what} {value!r} not supported (supports {', '.join(map(str, allowed))})"]


@dataclass(frozen=True)
class Provider:
    """One implementation a plugin offers for one capability.

    ``factory(request, hardware)`` builds the implementation object that the
    hot path then calls directly. ``priority``: higher wins; the built-in
    references use 0. ``supports(request, hardware) -> Verdict`` is optional
    and runs only after ``requirements`` are met.
    """

    name: str
    capability: Capability
    priority: int
    factory: Callable[[Any, Hardware], Any]
    requirements: Requirements = field(default_factory=Requirements)
    supports: Optional[Callable[[Any, Hardware], Verdict]] = None
    description: str = ""
    # Filled in by the registry: the distribution that registered it.
    plugin: str = ""
    plugin_version: str = ""

    def verdict(self, request: Any, hardware: Hardware) -> Verdict:
        problems = self.requirements.check(request, hardware)
        if problems:
            return Verdict.no("; ".join(problems))
        if self.supports is not None:
            try:
                v = self.supports(request, hardware)
            except Exception as exc:  # a plugin bug must not break selection
                return Verdict.no(f"supports() raised {type(exc).__name__}: {exc}")
            if not isinstance(v, Verdict):
                ok, reason = v if isinstance(v, tuple) else (bool(v), "")
                v = Verdict(bool(ok), reason or ("supported" if ok else "refused"))
            return v
        return Verdict.yes()
