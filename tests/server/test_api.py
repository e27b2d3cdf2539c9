"""The OpenAI-compatible endpoints on a tiny random Llama, through the
official openai client and raw HTTP: outputs match the offline engine."""
from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest

from kernelplane.engine import EngineConfig, LLMEngine, SamplingParams

from .conftest import CHAT_TEMPLATE, TINY_MODEL_NAME as MODEL
from .prometheus_text import parse_prometheus


@pytest.fixture(scope="module")
def offline(tiny_model_path) -> LLMEngine:
    """The same model run offline: what the server must reproduce."""
    return LLMEngine(EngineConfig(model=tiny_model_path, max_model_len=256))


def greedy(offline: LLMEngine, prompt, max_tokens: int, **params):
    return offline.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **params))[0]


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def sse_events(response: httpx.Response) -> list:
    """The payloads of a server-sent event stream; the last one must be [DONE]."""
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_health_and_models(tiny_server):
    assert httpx.get(tiny_server.url + "/health").json() == {"status": "ok"}
    models = client(tiny_server).models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == 256


def test_completion_matches_offline_greedy(tiny_server, offline):
    prompt = "The quick brown fox"
    expected = greedy(offline, prompt, 12)
    r = client(tiny_server).completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                               extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(expected.prompt_token_ids), 12)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


@pytest.mark.parametrize("prompts", [["Hello, world!", "def add(a, b):", "How"], [[5, 17, 42, 99], [7], [8, 9]]])
def test_batch_of_prompts(tiny_server, offline, prompts):
    expected = [greedy(offline, p, 6).text for p in prompts]
    r = client(tiny_server).completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0,
                                               extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == expected
    assert r.usage.completion_tokens == 18


def test_token_id_prompt(tiny_server, offline):
    r = client(tiny_server).completions.create(model=MODEL, prompt=[5, 17, 42, 99], max_tokens=6, temperature=0,
                                               extra_body={"ignore_eos": True})
    assert r.choices[0].text == greedy(offline, [5, 17, 42, 99], 6).text
    assert r.usage.prompt_tokens == 4


def test_streamed_completion_equals_non_streamed(tiny_server, offline):
    prompt = "Numbers like 12345"
    expected = greedy(offline, prompt, 16)
    chunks = list(client(tiny_server).completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_batch_tags_each_choice(tiny_server, offline):
    prompts = ["The lazy dog", "How are you"]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", tiny_server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    texts = ["", ""]
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
    assert texts == [greedy(offline, p, 5).text for p in prompts]


def test_chat_applies_the_template(tiny_server, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
    prompt = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and "Be brief." in prompt  # the tiny model's CHAT_TEMPLATE
    assert "<|assistant|>" in CHAT_TEMPLATE
    expected = greedy(offline, prompt, 10)
    r = client(tiny_server).chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                                    temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streamed_chat(tiny_server, offline):
    messages = [{"role": "user", "content": "The quick brown fox"}]
    expected = greedy(offline, offline.tokenizer.apply_chat_template(messages), 8)
    chunks = list(client(tiny_server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_stop_string_ends_the_choice(tiny_server, offline):
    full = greedy(offline, "The quick brown fox", 24).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop and stop in full
    r = client(tiny_server).completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=24,
                                               temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs(tiny_server, offline):
    c = client(tiny_server)
    r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=3,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(top) == 3 for top in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(max(top.values()) - x) < 1e-5 for top, x in zip(lp.top_logprobs, lp.token_logprobs))
    assert len(lp.tokens) == 4 and lp.text_offset[0] == 0
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=3,
                                  temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_seeded_sampling_is_reproducible(tiny_server):
    c = client(tiny_server)

    def sample(seed):
        return c.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=1.0, seed=seed,
                                    extra_body={"ignore_eos": True}).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_concurrent_requests_get_their_own_tokens(tiny_server, offline):
    prompts = ["The quick brown fox", "def add(a, b):", "Hello, world!", "Numbers like", "How are you today?"]
    expected = [greedy(offline, p, 10).text for p in prompts]
    c = client(tiny_server)

    def complete(prompt):
        return c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(complete, prompts)) == expected
    assert tiny_server.wait_idle()["kv_blocks_used"] == 0


class ReplayProposer:
    """Drafts the offline greedy continuation of known prompts: every draft is right."""

    def __init__(self, continuations: dict[tuple, list[int]]):
        self.continuations, self.tokens = continuations, {}

    def add_request(self, request_id, prompt_token_ids):
        self.tokens[request_id] = (tuple(prompt_token_ids), 0)

    def extend(self, request_id, token_ids):
        prompt, n = self.tokens[request_id]
        self.tokens[request_id] = (prompt, n + len(token_ids))

    def propose(self, request_ids, max_tokens):
        drafts = []
        for rid, k in zip(request_ids, max_tokens):
            prompt, n = self.tokens[rid]
            drafts.append(self.continuations.get(prompt, [])[n: n + k])
        return drafts

    def remove_request(self, request_id):
        del self.tokens[request_id]


@pytest.fixture(scope="module")
def speculative_server(start_tiny_server, offline):
    """A server whose speculative proposer replays the offline greedy output of PROMPT."""
    from kernelplane.capabilities import Capability
    from kernelplane.hookspecs import hookimpl
    from kernelplane.provider import Provider, Requirements
    from kernelplane.registry import Registry, reset_registry

    expected = greedy(offline, SPEC_PROMPT, 64)
    continuations = {tuple(expected.prompt_token_ids): expected.token_ids}

    class ReplayPlugin:
        @hookimpl
        def kernelplane_spec_proposers(self):
            return [Provider(name="replay", capability=Capability.SPEC_PROPOSER, priority=1,
                             factory=lambda request, hardware: ReplayProposer(continuations),
                             requirements=Requirements(methods=["replay"]))]

    registry = Registry()
    registry.register(ReplayPlugin(), name="test-replay")
    reset_registry(registry)
    try:
        return start_tiny_server(speculative_method="replay", num_speculative_tokens=3)
    finally:
        reset_registry(None)


SPEC_PROMPT = "the lazy dog"


def test_speculative_usage_and_metrics(speculative_server, offline):
    server = speculative_server
    c = client(server)
    before = parse_prometheus(httpx.get(server.url + "/metrics").text)
    r = c.completions.create(model=MODEL, prompt=SPEC_PROMPT, max_tokens=13, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == greedy(offline, SPEC_PROMPT, 13).text
    # token 1 from the prompt's forward; then 3 steps, each 3 accepted drafts + 1 token of the target model
    assert r.usage.model_extra["speculative"] == {"draft_tokens": 9, "accepted_tokens": 9, "verification_steps": 3,
                                                  "acceptance_rate": 1.0, "mean_acceptance_length": 4.0}
    details = r.usage.completion_tokens_details
    assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (9, 0)
    after = parse_prometheus(httpx.get(server.url + "/metrics").text)
    for name in ("kernelplane_spec_draft_tokens_total", "kernelplane_spec_accepted_tokens_total"):
        assert after[(name, ())] - before.get((name, ()), 0) == 9
    assert after[("kernelplane_inter_token_latency_seconds_count", ())] - \
        before[("kernelplane_inter_token_latency_seconds_count", ())] == 12  # one per token, also when 4 come at once

    streamed = list(c.completions.create(model=MODEL, prompt=SPEC_PROMPT, max_tokens=13, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == r.choices[0].text
    assert streamed[-1].usage.model_extra["speculative"]["accepted_tokens"] == 9

    # a request may opt out; other prompts get no drafts and no speculative block
    r = c.completions.create(model=MODEL, prompt=SPEC_PROMPT, max_tokens=13, temperature=0,
                             extra_body={"ignore_eos": True, "speculative": False})
    assert r.choices[0].text == greedy(offline, SPEC_PROMPT, 13).text
    assert "speculative" not in (r.usage.model_extra or {}) and r.usage.completion_tokens_details is None


def test_kernels_endpoint_explains_the_choice(tiny_server, start_tiny_server):
    data = httpx.get(tiny_server.url + "/v1/kernels").json()
    attention = data["selections"]["attention"]
    rows = {r["candidate"]: r for r in attention["candidates"]}
    assert all(r["reason"] for r in rows.values()) and all(r["verdict"] in ("ok", "refused") for r in rows.values())
    usable = [r for r in attention["candidates"] if r["verdict"] == "ok"]
    assert attention["chosen"] == max(usable, key=lambda r: r["priority"])["candidate"]
    assert rows["reference"]["verdict"] == "ok"
    if data["hardware"]["device_type"] == "cpu" and "triton" in rows:
        assert rows["triton"]["verdict"] == "refused" and "no GPU" in rows["triton"]["reason"]
    assert attention["request"]["num_heads"] == 4 and attention["request"]["num_kv_heads"] == 2
    # the same rules as KERNELPLANE_ATTENTION_BACKEND: an explicit choice shows as the override
    pinned = httpx.get(start_tiny_server(attention_backend="reference").url + "/v1/kernels").json()
    assert pinned["selections"]["attention"]["chosen"] == "reference"
    assert pinned["selections"]["attention"]["override"] == "reference"
    cache = data["kv_cache"]
    assert cache["tokens"] == cache["num_blocks"] * cache["block_size"] > 0 and cache["exact_tail_tokens"] == 0
    # A quantized cache read by a backend that knows the exact tail keeps one (64 tokens unless told otherwise).
    int8 = httpx.get(start_tiny_server(kv_cache_dtype="int8", attention_backend="reference").url + "/v1/kernels").json()
    assert int8["kv_cache"]["format"] == "int8" and int8["kv_cache"]["exact_tail_tokens"] == 64
    assert int8["selections"]["kv_quantizer"]["chosen"]


def test_metrics_parse_and_move(tiny_server):
    def scrape():
        return parse_prometheus(httpx.get(tiny_server.url + "/metrics").text)

    before = scrape()
    client(tiny_server).completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    httpx.post(tiny_server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1})
    after = scrape()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("kernelplane_requests_total", finish_reason="length") == 1
    assert delta("kernelplane_generation_tokens_total") == 5
    assert delta("kernelplane_prompt_tokens_total") >= 1
    assert delta("kernelplane_rejected_requests_total", status="400") == 1
    assert delta("kernelplane_time_to_first_token_seconds_count") == 1
    assert delta("kernelplane_inter_token_latency_seconds_count") == 4
    assert delta("kernelplane_e2e_request_latency_seconds_count") == 1
    stats = tiny_server.llm.stats()
    assert after[("kernelplane_kv_blocks_total", ())] == stats["kv_blocks_total"]
    for gauge in ("kernelplane_kv_blocks_used", "kernelplane_num_requests_running", "kernelplane_num_requests_waiting"):
        assert (gauge, ()) in after
    assert ("kernelplane_requests_total", (("finish_reason", "abort"),)) in after  # listed before any abort
