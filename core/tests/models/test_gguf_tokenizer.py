"""GGUF tokenizers: each ``tokenizer.ggml.pre`` name selects its model's split rule.

A byte-level vocabulary with two merges, "3 4" (ranked first) and "1 2",
shows where a rule cuts "12345": GPT-2 keeps the digits together (both merge),
Llama 3 cuts them in threes ("123" | "45": only "1 2" can merge), Qwen2 and
SmolLM2 split every digit (no merge at all).
"""
import gguf
import pytest
from tokenizers import pre_tokenizers

from kernelplane.models import ModelLoadError
from kernelplane.models.gguf_file import build_tokenizer, open_gguf

BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())


def write_tokenizer_gguf(path, pre, model="gpt2", add_bos=False):
    tokens = ["<s>", "</s>"] + BYTES + ["34", "12"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(["3 4", "1 2"])
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return open_gguf(path), tokens


@pytest.mark.parametrize("pre,pieces", [
    ("gpt-2", ["12", "34", "5"]),
    ("llama-bpe", ["12", "3", "4", "5"]),
    ("qwen2", ["1", "2", "3", "4", "5"]),
    ("smollm", ["1", "2", "3", "4", "5"]),
])
def test_split_rule_follows_the_pre_tokenizer_name(tmp_path, pre, pieces):
    reader, tokens = write_tokenizer_gguf(tmp_path / "t.gguf", pre)
    tok = build_tokenizer(reader, tmp_path / "t.gguf")
    ids = tok.encode("12345")
    assert [tokens[i] for i in ids] == pieces
    assert tok.decode(ids) == "12345"


def test_qwen2_normalizes_to_nfc(tmp_path):
    reader, _ = write_tokenizer_gguf(tmp_path / "t.gguf", "qwen2")
    tok = build_tokenizer(reader, tmp_path / "t.gguf")
    assert tok.encode("e\u0301") == tok.encode("\u00e9")


def test_special_tokens_and_bos(tmp_path):
    reader, tokens = write_tokenizer_gguf(tmp_path / "t.gguf", "gpt-2", add_bos=True)
    tok = build_tokenizer(reader, tmp_path / "t.gguf")
    ids = tok.encode("a</s>b")
    assert ids[0] == 0 and 1 in ids  # BOS added; "</s>" matched whole, not spelled out in bytes
    assert tok.encode("a", add_special_tokens=False) == [tokens.index("a")]
    assert tok.decode(ids) == "ab" and tok.decode(ids, skip_special_tokens=False) == "<s>a</s>b"
    assert tok.eos_token_ids == [1] and tok.bos_token_id == 0


@pytest.mark.parametrize("pre,model,message", [("tekken", "gpt2", "pre-tokenizer 'tekken'"),
                                               ("default", "llama", "tokenizer type 'llama'")])
def test_unsupported_tokenizers_are_refused(tmp_path, pre, model, message):
    reader, _ = write_tokenizer_gguf(tmp_path / "t.gguf", pre, model=model)
    with pytest.raises(ModelLoadError, match=message):
        build_tokenizer(reader, tmp_path / "t.gguf")
