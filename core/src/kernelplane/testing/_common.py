"""Helpers shared by the conformance suites."""
from __future__ import annotations

import pytest
import torch

from ..hardware import probe_hardware
from ..selection import SelectionError, select

# ||out - ref|| / ||ref|| allowed per compute dtype. float32 leaves room for
# TF32 matrix units on GPUs; bf16 for its 8-bit mantissa on the output.
REL_TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def test_device() -> torch.device:
    hw = probe_hardware()
    return torch.device(hw.torch_device if hw.is_gpu else "cpu")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: output has NaN/inf"
    err = relative_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.1e}"


def build_or_skip(capability: str, provider_name: str, request):
    """Build a provider for a request via selection; skip if it refuses the request."""
    try:
        return select(capability, request, override=provider_name).implementation
    except SelectionError as exc:
        row = next((c for c in exc.selection.candidates if c.provider.name == provider_name), None)
        if row is not None and not row.verdict.ok:
            pytest.skip(f"{provider_name} refuses this case: {row.verdict.reason}")
        raise


def provider_from_option(config, capability: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    names = dict(v.split("=", 1) for v in (config.getoption("kernelplane_provider", None) or []))
    if capability not in names:
        pytest.skip(f"no {capability} provider named (use --kernelplane-provider {capability}=NAME)")
    return names[capability]


class ConformanceBase:
    """Mixin: resolves which provider the suite checks."""

    capability: str = ""
    provider_name: str | None = None

    @pytest.fixture
    def provider(self, request) -> str:
        return provider_from_option(request.config, self.capability, self.provider_name)


def run_each_dtype(dtypes, check) -> None:
    """Run ``check(dtype)`` for each dtype; skip only if the provider refused them all."""
    reasons = []
    for dtype in dtypes:
        try:
            check(dtype)
        except pytest.skip.Exception as exc:
            reasons.append(f"{dtype}: {exc}")
    if len(reasons) == len(dtypes):
        pytest.skip("; ".join(reasons))
