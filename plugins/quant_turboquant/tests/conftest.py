"""Run the kernels through Triton's CPU interpreter: set before anything
imports triton and before the core probes the hardware. On a GPU machine,
``KERNELPLANE_TRITON_COMPILED=1`` runs the same tests on compiled kernels."""
import os

if os.environ.get("KERNELPLANE_TRITON_COMPILED") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture
def fresh_registry():
    """A registry rebuilt from the installed entry points for one test."""
    from kernelplane.registry import Registry, reset_registry

    registry = Registry()
    reset_registry(registry)
    yield registry
    reset_registry(None)
