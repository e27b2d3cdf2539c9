"""Bad requests get an OpenAI-style error with the right status, never a 500,
and the server keeps serving afterwards; a client that goes away aborts its
request; an engine failure fails only the request it hit."""
from __future__ import annotations

import contextlib
import threading
import time

import httpx
import openai
import pytest

from .conftest import TINY_MODEL_NAME as MODEL


def completion(server, **body):
    return httpx.post(server.url + "/v1/completions", json={"model": MODEL, **body}, timeout=30)


def assert_still_serving(server):
    r = completion(server, prompt="Hello", max_tokens=3, temperature=0, ignore_eos=True)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def assert_error(response, status: int, *needles: str, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                             429: "rate_limit_error", 500: "server_error"}[status]
    for needle in needles:
        assert needle in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("raw, status, needles, param", [
    ("{not json", 400, ["malformed JSON"], None),
    ("[1, 2]", 400, ["must be a JSON object"], None),
    ("", 400, ["must be a JSON object"], None),
    ('{"model": "tiny-llama", "prompt": "hi", "max_tokens": -1}', 400, ["max_tokens", "-1"], "max_tokens"),
    ('{"model": "tiny-llama", "prompt": "hi", "max_tokens": 0}', 400, ["max_tokens"], "max_tokens"),
    ('{"model": "tiny-llama", "prompt": "hi", "max_tokens": "many"}', 400, ["max_tokens"], "max_tokens"),
    ('{"model": "tiny-llama", "prompt": {"a": 1}}', 400, ["prompt must be a string, a list of strings"], "prompt"),
    ('{"model": "tiny-llama", "prompt": ["a", [1, 2]]}', 400, ["prompt must be a string"], "prompt"),
    ('{"model": "tiny-llama", "prompt": [1, true]}', 400, ["prompt must be a string"], "prompt"),
    ('{"model": "tiny-llama", "prompt": ["a", ""]}', 400, ["prompt must not be empty"], "prompt"),
    ('{"model": "tiny-llama", "prompt": ""}', 400, ["prompt"], "prompt"),
    ('{"model": "tiny-llama", "prompt": []}', 400, ["prompt"], "prompt"),
    ('{"model": "tiny-llama"}', 400, ["prompt", "Field required"], "prompt"),
    ('{"prompt": "hi"}', 400, ["model"], "model"),
    ('{"model": "tiny-llama", "prompt": "hi", "n": 2}', 400, ["n=2", "only n=1"], "n"),
    ('{"model": "tiny-llama", "prompt": "hi", "temperature": -0.5}', 400, ["temperature"], "temperature"),
    ('{"model": "tiny-llama", "prompt": "hi", "top_p": 0}', 400, ["top_p"], "top_p"),
    ('{"model": "tiny-llama", "prompt": "hi", "top_k": -3}', 400, ["top_k"], "top_k"),
    ('{"model": "tiny-llama", "prompt": "hi", "logprobs": 99}', 400, ["logprobs"], "logprobs"),
    ('{"model": "tiny-llama", "prompt": "hi", "seed": 1e30}', 400, ["seed"], "seed"),
    ('{"model": "tiny-llama", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', 400, ["stop"], "stop"),
    ('{"model": "tiny-llama", "prompt": "hi", "stop": [""]}', 400, ["stop"], "stop"),
    ('{"model": "tiny-llama", "prompt": "hi", "stream": "perhaps"}', 400, ["stream"], "stream"),
    ('{"model": "tiny-llama", "prompt": [1, 2, 99999999]}', 400, ["token ids", "99999999"], "prompt"),
    ('{"model": "tiny-llama", "prompt": "hi", "max_tokens": 100000}', 400, ["max_tokens=100000", "max_model_len is 256"],
     "max_tokens"),
])
def test_bad_completion_requests(tiny_server, raw, status, needles, param):
    r = httpx.post(tiny_server.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, status, *needles, param=param)
    assert_still_serving(tiny_server)


def test_unknown_model_is_404(tiny_server):
    assert_error(completion(tiny_server, model="gpt-9", prompt="hi"), 404, "gpt-9", MODEL, param="model",
                 code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert_still_serving(tiny_server)


def test_overlong_prompt_names_both_lengths(tiny_server):
    prompt_ids = list(range(5, 305))  # 300 tokens, max_model_len 256
    err = assert_error(completion(tiny_server, prompt=prompt_ids), 400, "300 tokens", "max_model_len is 256",
                       code="context_length_exceeded")
    assert err["param"] == "prompt"
    r = httpx.post(tiny_server.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "dog " * 400}]})
    assert_error(r, 400, "max_model_len is 256", param="messages", code="context_length_exceeded")
    assert_still_serving(tiny_server)


@pytest.mark.parametrize("body, needle", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "image_url"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -5}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
])
def test_bad_chat_requests(tiny_server, body, needle):
    r = httpx.post(tiny_server.url + "/v1/chat/completions", json={"model": MODEL, **body})
    assert_error(r, 400, needle)
    assert_still_serving(tiny_server)


def test_unknown_route_and_method(tiny_server):
    assert_error(httpx.get(tiny_server.url + "/v1/nothing"), 404, "Not Found")
    r = httpx.get(tiny_server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(tiny_server):
    tiny_server.wait_idle()
    aborted_before = tiny_server.llm.stats().get("finished_abort", 0)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", tiny_server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(6)]  # a few events in: the request is running
        assert tiny_server.engine.stats()["kv_blocks_used"] > 0
    stats = tiny_server.wait_idle()
    assert stats["finished_abort"] == aborted_before + 1
    assert stats["kv_blocks_used"] == 0
    assert_still_serving(tiny_server)


@contextlib.contextmanager
def slow_steps(server, seconds: float = 0.1):
    """Each engine step takes at least ``seconds``: requests stay running long enough to act on them."""
    original_step = server.llm.step

    def slow_step():
        time.sleep(seconds)
        return original_step()

    server.llm.step = slow_step
    try:
        yield
    finally:
        del server.llm.step


def test_client_disconnect_while_waiting_for_a_full_response_aborts(tiny_server):
    tiny_server.wait_idle()
    aborted_before = tiny_server.llm.stats().get("finished_abort", 0)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 250, "ignore_eos": True}
    with slow_steps(tiny_server):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=1.0))
        assert tiny_server.engine.stats()["num_running"] == 1
        stats = tiny_server.wait_idle(timeout=10)  # well before 250 slow steps would end
    assert stats["finished_abort"] == aborted_before + 1
    assert_still_serving(tiny_server)


def test_full_queue_is_429(start_tiny_server):
    server = start_tiny_server(max_waiting=0)
    for stream in (False, True):
        r = completion(server, prompt="hi", max_tokens=2, stream=stream)
        assert_error(r, 429, "queue is full", code="queue_full")
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).completions.create(
            model=MODEL, prompt="hi", max_tokens=2)


def test_queue_full_under_load_then_recovers(start_tiny_server):
    server = start_tiny_server(max_num_seqs=1, max_waiting=1)
    long = {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True}
    with slow_steps(server), httpx.stream("POST", server.url + "/v1/completions",
                                          json={"model": MODEL, **long, "stream": True}) as first:
        events = first.iter_lines()  # kept: dropping the iterator would close the connection
        next(events)  # running: holds the only sequence slot
        results = []
        waiter = threading.Thread(target=lambda: results.append(completion(server, prompt="Hi", max_tokens=2)))
        waiter.start()
        deadline = time.time() + 10
        while server.engine.stats()["num_waiting"] < 1 and time.time() < deadline:
            time.sleep(0.01)
        assert server.engine.stats()["num_waiting"] == 1
        assert_error(completion(server, prompt="Hey", max_tokens=2), 429, "queue is full")
    waiter.join(timeout=30)
    assert results and results[0].status_code == 200
    assert_still_serving(server)


def test_engine_failure_fails_that_request_only(tiny_server):
    poison = 313  # a token id no other test sends: the engine's forward raises when it sees it
    model = tiny_server.llm.model
    original_forward = model.forward

    def failing_forward(input_ids, *args, **kwargs):
        if (input_ids == poison).any():
            raise RuntimeError("simulated kernel failure")
        return original_forward(input_ids, *args, **kwargs)

    model.forward = failing_forward
    try:
        assert_error(completion(tiny_server, prompt=[5, 6, poison], max_tokens=3), 500, "simulated kernel failure",
                     code="engine_error")
        assert_still_serving(tiny_server)
        with httpx.stream("POST", tiny_server.url + "/v1/completions",
                          json={"model": MODEL, "prompt": [7, poison], "max_tokens": 3, "stream": True}) as r:
            assert r.status_code == 500  # failed on its first step, before the stream began
        assert_still_serving(tiny_server)
    finally:
        del model.forward
    assert model.forward == original_forward
    assert tiny_server.wait_idle()["kv_blocks_used"] == 0


def test_api_key(start_tiny_server):
    server = start_tiny_server(api_key="sekret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        assert_error(httpx.get(server.url + "/v1/models", headers=headers), 401, "API key", code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)
    assert ok.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    assert httpx.get(server.url + "/health").status_code == 200  # probes and scrapers need no key
    assert httpx.get(server.url + "/metrics").status_code == 200
