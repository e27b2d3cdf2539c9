"""GGUF files: tiny models written here, and the embedded SmolLM2, against transformers."""
import os

import pytest
import torch

import kernelplane.models.gguf_file as gguf_file
from kernelplane.models import load_model

PROMPT = "The quick brown fox jumps over 12345 lazy dogs. Über die Brücke! def add(a, b): return a + b"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELPLANE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name,f16", [("llama", False), ("llama-tied", True), ("llama3-rope", False), ("qwen2", False),
                                     ("qwen3", True)])
def test_tiny_gguf_matches_transformers(zoo, tmp_path, cache_dir, name, f16):
    path = zoo.write_gguf(name, tmp_path / f"{name}.gguf", f16=f16)
    loaded = load_model(str(path), progress=False)
    hf_tok = zoo.tiny_hf_tokenizer(name)
    ids = hf_tok(PROMPT)["input_ids"]
    assert loaded.tokenizer.encode(PROMPT) == ids
    assert loaded.tokenizer.eos_token_ids == [hf_tok.eos_token_id]
    theirs = zoo.hf_prefill_logits(zoo.tiny_hf(name), ids)
    # float16 storage rounds the weights: compare loosely there, tightly otherwise.
    tol = dict(atol=0.1, rtol=0.02) if f16 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(zoo.kp_prefill_logits(loaded, ids), theirs, **tol)
    if f16:  # ...but the argmax agrees almost everywhere
        assert (zoo.kp_prefill_logits(loaded, ids).argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


def test_second_load_uses_the_cache(zoo, tmp_path, cache_dir, monkeypatch):
    path = zoo.write_gguf("qwen2", tmp_path / "qwen2.gguf")
    first = load_model(str(path), progress=False)
    files = list((cache_dir / "models").glob("qwen2-*/weights-float32.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size > 0

    def no_dequantizing(*args, **kwargs):
        raise AssertionError("weights were dequantized again instead of read from the cache")

    monkeypatch.setattr(gguf_file, "iter_weights", no_dequantizing)
    monkeypatch.setattr(gguf_file, "open_gguf", no_dequantizing)  # config and tokenizer come from the cache too
    second = load_model(str(path), progress=False)
    assert second.config == first.config
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cache_is_keyed_by_file_and_dtype(zoo, tmp_path, cache_dir):
    path = zoo.write_gguf("llama", tmp_path / "m.gguf")
    load_model(str(path), progress=False)
    load_model(str(path), dtype="bfloat16", progress=False)
    assert len(list((cache_dir / "models").rglob("weights-*.safetensors"))) == 2
    # A rewritten file (new size/mtime) must not reuse the old conversion.
    zoo.write_gguf("llama-tied", path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    reloaded = load_model(str(path), progress=False)
    assert reloaded.config.tie_word_embeddings
    assert len(list((cache_dir / "models").rglob("weights-*.safetensors"))) == 3


def test_broken_cache_file_is_rebuilt(zoo, tmp_path, cache_dir):
    path = zoo.write_gguf("llama", tmp_path / "m.gguf")
    good = load_model(str(path), progress=False)
    (cached,) = (cache_dir / "models").rglob("weights-*.safetensors")
    cached.write_bytes(b"garbage")
    again = load_model(str(path), progress=False)
    assert torch.equal(again.model.embed_tokens.weight, good.model.embed_tokens.weight)
    assert cached.stat().st_size > 100


def test_cache_that_does_not_fit_is_rebuilt(zoo, tmp_path, cache_dir):
    from safetensors.torch import load_file, save_file

    path = zoo.write_gguf("llama", tmp_path / "m.gguf")
    good = load_model(str(path), progress=False)
    (cached,) = (cache_dir / "models").rglob("weights-*.safetensors")
    weights = load_file(str(cached))
    del weights["layers.1.mlp.down_proj.weight"]  # e.g. written by an older layout
    save_file(weights, str(cached))
    again = load_model(str(path), progress=False)
    assert torch.equal(again.model.layers[1].mlp.down_proj.weight, good.model.layers[1].mlp.down_proj.weight)
    assert "layers.1.mlp.down_proj.weight" in load_file(str(cached))


# ---- SmolLM2, the embedded default ---------------------------------------

SMOL_TEXTS = ["Hello world", "  multiple   spaces\n\n\ttabs and trailing  ", "1234567890 + 3.14159 = 42",
              "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
              "ünïcödé, 日本語のテキスト, emoji 🎉🚀, Ελληνικά", "<|im_start|>user\nhi<|im_end|>\n", "a"]


@pytest.mark.parametrize("text", SMOL_TEXTS)
def test_smollm2_tokenizer_matches_transformers(zoo, text):
    ours, theirs = zoo.smollm2_kp().tokenizer, zoo.smollm2_hf_tokenizer()
    ids = theirs(text)["input_ids"]
    assert ours.encode(text) == ids
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_smollm2_special_ids(zoo):
    ours, theirs = zoo.smollm2_kp().tokenizer, zoo.smollm2_hf_tokenizer()
    assert theirs.eos_token_id in ours.eos_token_ids
    assert ours.bos_token_id == theirs.bos_token_id


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2+2?"}],  # the template adds its default system prompt
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye ünï 🎉"}],
])
def test_smollm2_chat_template_matches_transformers(zoo, messages):
    ours, theirs = zoo.smollm2_kp().tokenizer, zoo.smollm2_hf_tokenizer()
    for gen in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == \
            theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_smollm2_prefill_logits_match_transformers(zoo):
    loaded = zoo.smollm2_kp()
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colors of the rainbow."}])
    ids = loaded.tokenizer.encode(text)
    ours = zoo.kp_prefill_logits(loaded, ids)
    theirs = zoo.hf_prefill_logits(zoo.smollm2_hf(), ids)
    torch.testing.assert_close(ours, theirs, atol=5e-4, rtol=1e-5)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
