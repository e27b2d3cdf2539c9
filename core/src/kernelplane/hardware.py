"""What this machine offers, probed once and cached.

``probe_hardware()`` is pure from the caller's view: same answer every call.
Tests replace it with ``override_hardware(...)``; platform plugins add facts
through the ``kernelplane_hardware_facts`` hook (see ``registry``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
from typing import Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

TritonMode = Literal["compiled", "interpreter", "unavailable"]


class Hardware(BaseModel):
    model_config = ConfigDict(frozen=True)

    device_type: str = Field(description="cuda, rocm, xpu, mps or cpu")
    device_name: str
    compute_capability: Optional[tuple[int, int]] = None
    sm_count: Optional[int] = None
    memory_bytes: Optional[int] = None
    torch_version: str
    triton_version: Optional[str] = None
    triton_mode: TritonMode = "unavailable"
    extra: dict = Field(default_factory=dict, description="facts added by platform plugins")

    @property
    def is_gpu(self) -> bool:
        return self.device_type in ("cuda", "rocm", "xpu")

    @property
    def torch_device(self) -> str:
        return "cuda" if self.device_type in ("cuda", "rocm") else self.device_type

    def describe(self) -> str:
        parts = [f"{self.device_type}: {self.device_name}"]
        if self.compute_capability:
            parts.append("sm_%d%d" % self.compute_capability)
        if self.sm_count:
            parts.append(f"{self.sm_count} SMs")
        if self.memory_bytes:
            parts.append(f"{self.memory_bytes / 2**30:.1f} GiB")
        parts.append(f"torch {self.torch_version}")
        parts.append(f"triton {self.triton_version} ({self.triton_mode})" if self.triton_version else "triton not installed")
        return ", ".join(parts)


def _triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:
        return None
    return getattr(triton, "__version__", "unknown")


def _probe() -> Hardware:
    import torch

    triton_version = _triton_version()
    interpret = os.environ.get("TRITON_INTERPRET", "") == "1"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        is_rocm = getattr(torch.version, "hip", None) is not None
        mode: TritonMode = "unavailable"
        if triton_version:
            mode = "interpreter" if interpret else "compiled"
        return Hardware(
            device_type="rocm" if is_rocm else "cuda",
            device_name=props.name,
            compute_capability=(props.major, props.minor),
            sm_count=props.multi_processor_count,
            memory_bytes=props.total_memory,
            torch_version=torch.__version__,
            triton_version=triton_version,
            triton_mode=mode,
        )
    return _cpu_facts(torch.__version__, triton_version, interpret)


def _cpu_facts(torch_version: str, triton_version: Optional[str], interpret: bool) -> Hardware:
    return Hardware(
        device_type="cpu",
        device_name=platform.processor() or platform.machine() or "cpu",
        extra={"cpu_count": os.cpu_count()},
        torch_version=torch_version,
        triton_version=triton_version,
        # On CPU Triton can only run through its interpreter, and only when the
        # user asked for it explicitly (TRITON_INTERPRET=1): it is far too slow
        # to pick silently.
        triton_mode="interpreter" if (triton_version and interpret) else "unavailable",
    )


_override: list[Hardware] = []


@functools.lru_cache(maxsize=1)
def _probe_cached() -> Hardware:
    return _probe()


def probe_hardware() -> Hardware:
    """The hardware facts of this process (cached after the first call)."""
    if _override:
        return _override[-1]
    from .registry import get_registry

    base = _probe_cached()
    extra = get_registry().hardware_facts(base)
    return base.model_copy(update={"extra": {**base.extra, **extra}}) if extra else base


def hardware_for_device(device: str) -> Hardware:
    """The facts selection should see when the work runs on ``device``.

    On a GPU machine a user may still ask for ``--device cpu``: kernels must
    then be chosen for the CPU, not for the GPU the probe found.
    """
    hw = probe_hardware()
    if device == "cpu" and hw.device_type != "cpu":
        return _cpu_facts(hw.torch_version, hw.triton_version, hw.triton_mode == "interpreter")
    return hw


@contextlib.contextmanager
def override_hardware(hardware: Hardware | None = None, **fields) -> Iterator[Hardware]:
    """Pretend to run on other hardware (tests, ``explain --device``)."""
    hw = (hardware or _probe_cached()).model_copy(update=fields)
    _override.append(hw)
    try:
        yield hw
    finally:
        _override.pop()
