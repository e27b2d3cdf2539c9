import pytest

from kernelplane.registry import reset_registry


@pytest.fixture
def fresh_registry():
    """A registry rebuilt for the test (and dropped afterwards), so in-test plugins do not leak."""
    from kernelplane.registry import Registry

    reg = Registry()
    reset_registry(reg)
    yield reg
    reset_registry(None)
