"""Servers for the tests: a tiny random Llama checkpoint (fast, any behaviour
but no meaning) and the embedded default model, each behind a real uvicorn
server on a free port of 127.0.0.1."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from kernelplane.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from kernelplane.server.app import create_app

TINY_MODEL_NAME = "tiny-llama"
TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Continuous batching admits new requests while others decode.",
    "def add(a, b):\n    return a + b\n",
    "Hello, world! How are you today? Numbers like 12345 appear too.",
] * 4
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A randomly initialized LlamaForCausalLM and a byte-level BPE tokenizer, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TOKENIZER_TEXT, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a wide spread keeps logits far from uniform: no near-ties in greedy decoding
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


class RunningServer:
    """uvicorn serving ``create_app`` over a fresh async engine, in a thread."""

    def __init__(self, llm: LLMEngine, served_model_name: str, api_key: str | None = None):
        self.engine = AsyncLLMEngine(engine=llm)
        self.engine.start()
        self.llm = llm
        self.model = served_model_name
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(self.engine, served_model_name=served_model_name, api_key=api_key)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("test server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.shutdown()

    def wait_idle(self, timeout: float = 20) -> dict:
        """Engine stats once nothing runs, waits or holds a KV block."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            stats = self.engine.stats()
            if stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == stats["num_pending"] == 0:
                return stats
            time.sleep(0.05)
        raise AssertionError(f"engine never went idle: {self.engine.stats()}")


@pytest.fixture(scope="session")
def start_tiny_server(tiny_model_path):
    """A factory: a tiny-model server with the given EngineConfig fields; all stopped at session end."""
    servers = []

    def start(api_key: str | None = None, **config) -> RunningServer:
        config = {"max_model_len": 256, "max_num_seqs": 4, **config}
        server = RunningServer(LLMEngine(EngineConfig(model=tiny_model_path, **config)), TINY_MODEL_NAME, api_key)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def tiny_server(start_tiny_server) -> RunningServer:
    return start_tiny_server()
