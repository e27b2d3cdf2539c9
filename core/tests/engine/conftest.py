import importlib.util
import sys
from pathlib import Path

import pytest


def load_zoo():
    """The shared model zoo (core/tests/models/model_zoo.py), imported once per session."""
    name = "kernelplane_test_model_zoo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "models" / "model_zoo.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def zoo():
    return load_zoo()


@pytest.fixture(scope="session")
def tiny(zoo):
    """The tiny random Llama, loaded by kernelplane."""
    return zoo.tiny_kp("llama")


@pytest.fixture(scope="session")
def tiny_prompts(tiny):
    """Token ids of prompts of different lengths (1 to ~60 tokens)."""
    texts = ["Hello", "The quick brown fox jumps over the lazy dog and",
             "A paged KV cache stores keys and values in fixed-size blocks. " * 2,
             "def add(a, b):\n    return a + b\n" * 4, "12345"]
    return [tiny.tokenizer.encode(t) for t in texts]


@pytest.fixture(scope="session")
def tiny_reference(zoo, tiny_prompts):
    """transformers' greedy continuation (32 tokens) of each prompt."""
    hf = zoo.tiny_hf("llama")
    return [zoo.hf_greedy(hf, ids, 32) for ids in tiny_prompts]


@pytest.fixture
def make_engine(tiny):
    """An LLMEngine over the tiny Llama (reference attention) with config overrides."""
    from kernelplane.engine import EngineConfig, LLMEngine

    def make(loaded=None, **overrides):
        config = dict(attention_backend="reference", max_num_seqs=8, block_size=4)
        config.update(overrides)
        return LLMEngine(EngineConfig(**config), loaded=loaded or tiny)

    return make
