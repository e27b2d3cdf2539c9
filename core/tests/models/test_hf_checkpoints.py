"""Hugging Face checkpoint folders: logits, tokenizer and chat template match transformers."""
import pytest
import torch

from kernelplane.models import ModelLoadError, load_model

# Long enough that positions matter (rope scaling, rope_theta) and that the prompt spans several KV blocks.
PROMPT = ("Continuous batching admits new requests while others decode. The quick brown fox jumps over 12345 "
          "lazy dogs; def add(a, b): return a + b. Über die Brücke, 3.14159!") * 2


@pytest.mark.parametrize("name", ["llama", "llama-tied", "llama3-rope", "qwen2", "qwen3"])
def test_prefill_logits_match_transformers(zoo, name):
    loaded = zoo.tiny_kp(name)
    ids = loaded.tokenizer.encode(PROMPT)
    assert len(ids) > 64
    ours = zoo.kp_prefill_logits(loaded, ids)
    theirs = zoo.hf_prefill_logits(zoo.tiny_hf(name), ids)
    assert theirs.std() > 1.0  # far from uniform: a wrong weight would show
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)


def test_config_facts(zoo):
    llama3 = zoo.tiny_kp("llama3-rope").config
    assert llama3.rope_theta == 500000.0 and llama3.rope_scaling["rope_type"] == "llama3"
    assert zoo.tiny_kp("qwen2").config.rope_theta == 1000000.0
    assert zoo.tiny_kp("qwen2").config.attention_bias and not zoo.tiny_kp("llama").config.attention_bias
    assert zoo.tiny_kp("qwen3").config.qk_norm and zoo.tiny_kp("qwen3").config.head_dim == 32
    assert zoo.tiny_kp("llama-tied").config.tie_word_embeddings
    assert zoo.tiny_kp("llama").config.eos_token_ids == [zoo.tiny_hf_tokenizer("llama").eos_token_id]


def test_llama_attention_bias_includes_o_proj(zoo, tmp_path):
    # Llama's attention_bias puts a bias on o_proj too (Qwen2's does not).
    folder = zoo.make_checkpoint(tmp_path / "m", "llama", seed=3, attention_bias=True)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert hf.model.layers[0].self_attn.o_proj.bias is not None
    loaded = load_model(str(folder), progress=False)
    ids = loaded.tokenizer.encode(PROMPT)[:40]
    torch.testing.assert_close(zoo.kp_prefill_logits(loaded, ids), zoo.hf_prefill_logits(hf, ids), atol=1e-4, rtol=1e-5)


def test_unused_tensors_are_refused(zoo, tmp_path):
    # An MLP bias has no place in the model: loading must fail, not drop it silently.
    folder = zoo.make_checkpoint(tmp_path / "m", "llama", mlp_bias=True)
    with pytest.raises(ModelLoadError, match=r"mlp\.(gate|up|down)_proj\.bias") as err:
        load_model(str(folder), progress=False)
    assert str(folder) in str(err.value)


TEXTS = ["Hello, world!", "  leading and   inner   spaces\n\n\ttab", "12345 + 678 = 99.5",
         "def f(x):\n    return x ** 2  # comment", "ünïcödé 日本語 🎉 Brücke", "</s> inside text <s>", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(zoo, text):
    ours, theirs = zoo.tiny_kp("llama").tokenizer, zoo.tiny_hf_tokenizer("llama")
    ids = theirs(text)["input_ids"]
    assert ours.encode(text) == ids
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)


def test_chat_template_matches_transformers(zoo):
    ours, theirs = zoo.tiny_kp("llama").tokenizer, zoo.tiny_hf_tokenizer("llama")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    for gen in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == \
            theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_cpu_weights_are_64_byte_aligned(zoo, tmp_path, monkeypatch):
    # Weights straight from safetensors start at arbitrary 8-byte offsets; CPU matmuls are slower on those.
    monkeypatch.setenv("KERNELPLANE_CACHE_DIR", str(tmp_path / "cache"))
    gguf_path = zoo.write_gguf("llama", tmp_path / "m.gguf")
    for loaded in (load_model(str(zoo.tiny_checkpoint("llama")), progress=False),
                   load_model(str(gguf_path), progress=False), load_model(str(gguf_path), progress=False)):
        misaligned = [n for n, p in loaded.model.named_parameters() if p.data_ptr() % 64]
        assert not misaligned, misaligned[:5]
