import importlib.util
import sys
from pathlib import Path

import pytest


def load_zoo():
    """The shared model zoo module, imported once per session (it caches the models it loads)."""
    name = "kernelplane_test_model_zoo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "model_zoo.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def zoo():
    return load_zoo()
