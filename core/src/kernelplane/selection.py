"""Choosing one provider per capability, once, and explaining the choice.

Rules: drop providers whose requirements or ``supports`` say no; rank the
rest by priority (higher first, then name); build the first whose factory
(and ``warmup()``, if it has one) succeeds. An explicit choice (argument, or
``KERNELPLANE_<CAPABILITY>_BACKEND``) that cannot run is an error listing
every candidate. A failing build without an override falls back to the
next candidate with a warning, or raises when ``strict``.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from .capabilities import Capability
from .hardware import Hardware, probe_hardware
from .provider import Provider, Verdict
from .registry import Registry, get_registry

log = logging.getLogger("kernelplane")


class SelectionError(RuntimeError):
    """No provider can serve the request, or an explicit choice cannot run."""

    def __init__(self, message: str, selection: "Selection"):
        super().__init__(message)
        self.selection = selection


class BackendFallbackWarning(RuntimeWarning):
    pass


@dataclass
class Candidate:
    provider: Provider
    verdict: Verdict
    chosen: bool = False
    note: str = ""

    def row(self) -> dict:
        return {
            "candidate": self.provider.name,
            "plugin": self.provider.plugin,
            "priority": self.provider.priority,
            "verdict": "ok" if self.verdict.ok else "refused",
            "reason": self.verdict.reason + (f" ({self.note})" if self.note else ""),
            "chosen": self.chosen,
        }


@dataclass
class Selection:
    capability: Capability
    request: Any
    hardware: Hardware
    candidates: list[Candidate]
    override: Optional[str] = None
    chosen: Optional[Provider] = None
    implementation: Any = field(default=None, repr=False)

    def rows(self) -> list[dict]:
        return [c.row() for c in self.candidates]

    def as_dict(self) -> dict:
        return {
            "capability": self.capability.value,
            "chosen": self.chosen.name if self.chosen else None,
            "override": self.override,
            "request": self.request.model_dump() if hasattr(self.request, "model_dump") else self.request,
            "candidates": self.rows(),
        }

    def format_table(self) -> str:
        return format_rows(self.rows(), title=f"{self.capability.value}" + (f"  (override: {self.override})" if self.override else ""))


def format_rows(rows: list[dict], title: str = "") -> str:
    headers = ["", "candidate", "plugin", "priority", "verdict", "reason"]
    body = [["*" if r["chosen"] else "", r["candidate"], r["plugin"], str(r["priority"]), r["verdict"], r["reason"]] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    widths[-1] = len(headers[-1])  # the reason runs free
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [title] if title else []
    out.append(line(headers))
    out += [line(b) for b in body]
    return "\n".join(out)


def rank(capability: Capability, request: Any, hardware: Optional[Hardware] = None,
         registry: Optional[Registry] = None) -> list[Candidate]:
    """All providers with their verdicts, best first (supported before refused)."""
    hardware = hardware or probe_hardware()
    registry = registry or get_registry()
    cands = [Candidate(p, p.verdict(request, hardware)) for p in registry.providers(capability)]
    cands.sort(key=lambda c: (not c.verdict.ok, -c.provider.priority, c.provider.name))
    return cands


def _describe_request(request: Any) -> str:
    if hasattr(request, "model_dump"):
        fields = request.model_dump(exclude_defaults=False)
        return ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    return repr(request)


def _failure(selection: Selection, headline: str) -> SelectionError:
    lines = [headline, f"  request: {_describe_request(selection.request)}", f"  hardware: {selection.hardware.describe()}", "  candidates:"]
    for c in selection.candidates:
        lines.append(f"    {c.provider.name} ({c.provider.plugin or '?'}, priority {c.provider.priority}): "
                     f"{'ok' if c.verdict.ok else 'refused'}: {c.verdict.reason}{' (' + c.note + ')' if c.note else ''}")
    if not selection.candidates:
        lines.append("    (none installed)")
    return SelectionError("\n".join(lines), selection)


def _build(provider: Provider, request: Any, hardware: Hardware) -> Any:
    impl = provider.factory(request, hardware)
    warmup = getattr(impl, "warmup", None)
    if callable(warmup):
        warmup()
    return impl


def select(capability: Capability | str, request: Any, *, override: Optional[str] = None,
           strict: Optional[bool] = None, hardware: Optional[Hardware] = None,
           registry: Optional[Registry] = None, build: bool = True) -> Selection:
    """Pick and build the provider for ``request``; see the module docstring."""
    capability = Capability(capability)
    hardware = hardware or probe_hardware()
    if override is None:
        override = os.environ.get(capability.env_var) or None
    if strict is None:
        strict = os.environ.get("KERNELPLANE_STRICT", "") not in ("", "0")
    candidates = rank(capability, request, hardware, registry)
    sel = Selection(capability, request, hardware, candidates, override=override)

    if override:
        match = [c for c in candidates if c.provider.name == override]
        if not match:
            raise _failure(sel, f"{capability.value} backend {override!r} (explicitly requested) is not installed")
        cand = match[0]
        if not cand.verdict.ok:
            raise _failure(sel, f"{capability.value} backend {override!r} (explicitly requested) cannot run here: {cand.verdict.reason}")
        ordered = [cand]
    else:
        ordered = [c for c in candidates if c.verdict.ok]

    for cand in ordered:
        if not build:
            cand.chosen = True
            sel.chosen = cand.provider
            return sel
        try:
            sel.implementation = _build(cand.provider, request, hardware)
        except Exception as exc:
            cand.note = f"build failed: {type(exc).__name__}: {exc}"
            if override or strict:
                why = "explicitly requested" if override else "strict mode"
                raise _failure(sel, f"{capability.value} backend {cand.provider.name!r} ({why}) failed to build: {exc}") from exc
            msg = f"{capability.value} backend {cand.provider.name!r} failed to build ({type(exc).__name__}: {exc}); falling back to the next candidate"
            log.warning(msg)
            warnings.warn(msg, BackendFallbackWarning, stacklevel=2)
            continue
        cand.chosen = True
        sel.chosen = cand.provider
        return sel
    raise _failure(sel, f"no {capability.value} backend can run this request")
