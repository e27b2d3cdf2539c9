"""`kernelplane generate` and `kernelplane serve` as a user runs them (subprocesses)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from kernelplane.cli import build_parser, main
from kernelplane.engine import EngineConfig, LLMEngine, SamplingParams


def kernelplane(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernelplane.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def offline(tiny_model_path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_model_path))


def test_generate_prints_only_the_generated_text(tiny_model_path, offline):
    prompt = "The quick brown fox"
    expected = offline.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].text
    out = kernelplane("generate", "--model", tiny_model_path, "--max-tokens", "12", prompt)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"


def test_impossible_attention_backend_exits_2_listing_every_candidate(tiny_model_path):
    out = kernelplane("generate", "--model", tiny_model_path, "--attention-backend", "no_such_backend", "hi")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert "no_such_backend" in out.stderr and "candidates:" in out.stderr
    assert "reference (kernelplane-core, priority 0): ok" in out.stderr


# The rest runs the command in-process (same code path, no interpreter start-up).
def generate_in_process(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_chat_applies_the_template(capsys, tiny_model_path, offline):
    prompt = offline.tokenizer.apply_chat_template([{"role": "user", "content": "Hello, world!"}])
    expected = offline.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0].text
    code, out, _ = generate_in_process(capsys, "--model", tiny_model_path, "--chat", "--max-tokens", "8", "Hello, world!")
    assert code == 0 and out == expected + "\n"


def test_generate_seeded_sampling_and_speculation(capsys, tiny_model_path, offline):
    pytest.importorskip("kernelplane_spec_ngram")
    prompt = "the lazy dog the lazy dog the lazy dog"
    expected = offline.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0].text
    code, out, _ = generate_in_process(
        capsys, "--model", tiny_model_path, "--max-tokens", "10", "--speculative-config",
        '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}', prompt)
    assert code == 0 and out == expected + "\n"  # speculation never changes greedy output
    sampled = [generate_in_process(capsys, "--model", tiny_model_path, "--max-tokens", "10", "--temperature", "1",
                                   "--seed", "3", prompt)[1] for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0] != out


def test_speculative_config_is_read_like_vllm():
    from kernelplane.server.commands import engine_config_from_args

    parser = build_parser()
    args = parser.parse_args(["serve", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4, '
                              '"prompt_lookup_max": 4, "prompt_lookup_min": 2}'])
    cfg = engine_config_from_args(args)
    assert (cfg.speculative_method, cfg.num_speculative_tokens) == ("ngram", 4)
    assert cfg.speculative_options == {"prompt_lookup_max": 4, "prompt_lookup_min": 2}
    cfg = engine_config_from_args(parser.parse_args(["generate", "--speculative", "ngram", "--num-speculative-tokens",
                                                     "2", "--attention-backend", "reference", "x"]))
    assert (cfg.speculative_method, cfg.num_speculative_tokens, cfg.attention_backend) == ("ngram", 2, "reference")


@pytest.mark.parametrize("args, needles", [
    (["--kv-cache-dtype", "int3"], ["int3"]),
    (["--speculative-config", "{oops"], ["--speculative-config", "JSON"]),
    (["--speculative-config", '{"num_speculative_tokens": 2}'], ["--speculative-config", "method"]),
    (["--speculative", "no_such_method"], ["no_such_method"]),
    (["--max-num-seqs", "0"], ["max_num_seqs"]),
    (["--top-p", "0"], ["top_p"]),
    (["--model", "/nonexistent/model.gguf"], ["does not exist"]),
])
def test_bad_flags_exit_2_with_the_reason(capsys, tiny_model_path, args, needles):
    code, out, err = generate_in_process(capsys, "--model", tiny_model_path, *args, "hi")
    assert code == 2 and out == ""
    for needle in needles:
        assert needle in err, err


def test_serve_logs_the_selection_and_answers(tiny_model_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "kernelplane.cli", "serve", "--model", tiny_model_path,
                             "--served-model-name", "tiny", "--port", str(port), "--max-model-len", "128"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1]
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3,
                                                      "ignore_eos": True}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == 128
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "== attention:" in stderr and "reference" in stderr and "verdict" in stderr
