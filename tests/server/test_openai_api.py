"""The server through the official openai client and raw HTTP, bad input included."""
import json
import time

import httpx
import openai
import pytest

from .conftest import start_server


def client(server, key="unused"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def wait_idle(server, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = server.engine.stats()
        if st["num_running"] == 0 and st["num_waiting"] == 0 and st["kv_blocks_used"] == 0:
            return st
        time.sleep(0.05)
    raise AssertionError(f"engine never went idle: {server.engine.stats()}")


def assert_still_serving(server):
    r = client(server).completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.choices[0].text.strip().startswith("Paris")


def test_models_and_health(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client(server).models.list().data] == ["smollm2"]


def test_chat_completion(server):
    r = client(server).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=20, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens >= 1


def test_streamed_completion_matches_non_streamed(server):
    c = client(server)
    full = c.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=16, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full and len(text) > 10
    assert chunks[-1].usage.completion_tokens == 16


def test_streamed_chat(server):
    chunks = list(client(server).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks)


def test_logprobs(server):
    r = client(server).completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 3 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_seeded_sampling_is_reproducible(server):
    c = client(server)
    a = [c.completions.create(model="smollm2", prompt="My favourite colour is", max_tokens=12, temperature=1.0, seed=7).choices[0].text
         for _ in range(2)]
    assert a[0] == a[1]


@pytest.mark.parametrize("body, status, needle", [
    ("{not json", 400, "malformed JSON"),
    ('{"model": "smollm2", "prompt": "hi", "max_tokens": -1}', 400, "max_tokens"),
    ('{"model": "smollm2", "prompt": "hi", "max_tokens": "many"}', 400, "max_tokens"),
    ('{"model": "smollm2", "prompt": {"a": 1}}', 400, "prompt"),
    ('{"model": "smollm2"}', 400, "prompt"),
    ('{"model": "gpt-9", "prompt": "hi"}', 404, "does not exist"),
    ('{"model": "smollm2", "prompt": "hi", "n": 2}', 400, "n=1"),
    ('{"model": "smollm2", "prompt": "hi", "temperature": -0.5}', 400, "temperature"),
    ('{"model": "smollm2", "prompt": "hi", "max_tokens": 100000}', 400, "max_model_len"),
    ('{"model": "smollm2", "prompt": [1, 2, 999999999]}', 400, "token ids"),
])
def test_bad_completion_requests(server, body, status, needle):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    assert_still_serving(server)


def test_overlong_prompt(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "smollm2", "prompt": "word " * 800})
    assert r.status_code == 400
    assert "max_model_len is 512" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "smollm2", "messages": [{"role": "user", "content": "word " * 800}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert_still_serving(server)


def test_bad_chat_requests(server):
    for body in [{"model": "smollm2", "messages": []}, {"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}]:
        r = httpx.post(server.url + "/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
    assert_still_serving(server)


def test_client_disconnect_mid_stream_frees_blocks(server):
    body = {"model": "smollm2", "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert server.engine.stats()["kv_blocks_used"] > 0
    stats = wait_idle(server)
    assert stats["finished_abort"] >= 1
    assert_still_serving(server)


def test_metrics_move(server):
    before = httpx.get(server.url + "/metrics").text
    assert_still_serving(server)
    after = httpx.get(server.url + "/metrics").text

    def value(text, name):
        return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "{"))

    assert value(after, "kernelplane_generation_tokens_total") > value(before, "kernelplane_generation_tokens_total")
    assert value(after, "kernelplane_time_to_first_token_seconds_count") > value(before, "kernelplane_time_to_first_token_seconds_count")
    for name in ("kernelplane_kv_blocks_total", "kernelplane_num_requests_waiting", "kernelplane_inter_token_latency_seconds_bucket"):
        assert name in after


def test_kernels_endpoint_explains_the_choice(server):
    data = httpx.get(server.url + "/v1/kernels").json()
    attn = data["selections"]["attention"]
    assert attn["chosen"] in {r["candidate"] for r in attn["candidates"] if r["verdict"] == "ok"}
    triton = [r for r in attn["candidates"] if r["candidate"] == "triton"]
    if triton and data["hardware"]["device_type"] == "cpu":
        assert "no GPU" in triton[0]["reason"]


def test_full_queue_is_429(smollm):
    s = start_server(smollm, max_waiting=0)
    try:
        r = httpx.post(s.url + "/v1/completions", json={"model": "smollm2", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        r = httpx.post(s.url + "/v1/completions", json={"model": "smollm2", "prompt": "hi", "max_tokens": 2, "stream": True})
        assert r.status_code == 429
    finally:
        s.stop()


def test_api_key(smollm):
    s = start_server(smollm, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(s, key="wrong").models.list()
        assert client(s, key="sekret").models.list().data[0].id == "smollm2"
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key
    finally:
        s.stop()


def test_concurrent_requests_get_their_own_tokens(server):
    import concurrent.futures

    prompts = ["The capital of France is", "def add(a, b):", "Water boils at", "The largest planet is"]
    c = client(server)
    solo = [c.completions.create(model="smollm2", prompt=p, max_tokens=10, temperature=0).choices[0].text for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: c.completions.create(model="smollm2", prompt=p, max_tokens=10, temperature=0).choices[0].text, prompts))
    assert together == solo
