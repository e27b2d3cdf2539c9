"""Reading a Hugging Face checkpoint folder: config.json, safetensors, tokenizer.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from .config import ModelConfig
from .errors import ModelLoadError
from .tokenizer import Tokenizer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file}: cannot read ({exc})") from exc


def _optional_json(file: Path) -> dict:
    return _read_json(file) if file.is_file() else {}


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def read_config(folder: Path) -> ModelConfig:
    raw = _read_json(folder / "config.json")
    archs = raw.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None and not archs:
        arch = _MODEL_TYPES.get(raw.get("model_type"))
    if arch is None:
        raise ModelLoadError(f"{folder}: architecture {archs or raw.get('model_type')!r} is not supported "
                             f"(supported: {', '.join(ARCHITECTURES)})")
    if raw.get("use_sliding_window"):
        raise ModelLoadError(f"{folder}: Qwen per-layer sliding-window attention is not supported")
    # transformers 5 keeps rope_theta and the scaling in one "rope_parameters" dict.
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", None) or raw.get("rope_theta", 10000.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        rope = {}
    elif rope_type not in ("linear", "llama3"):
        raise ModelLoadError(f"{folder}: rope scaling {rope_type!r} is not supported (linear, llama3)")
    try:
        heads = raw["num_attention_heads"]
        eos = _ids(raw.get("eos_token_id"))
        generation = _optional_json(folder / "generation_config.json")
        eos += [i for i in _ids(generation.get("eos_token_id")) if i not in eos]
        return ModelConfig(
            architecture=arch, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"], num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=rope_theta, rope_scaling=rope or None,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v biases; Llama and Qwen3 say so in attention_bias.
            attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
            attention_output_bias=arch == "llama" and bool(raw.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            sliding_window=raw.get("sliding_window") if arch == "llama" else None,
            bos_token_id=raw.get("bos_token_id"), eos_token_ids=eos,
        )
    except KeyError as exc:
        raise ModelLoadError(f"{folder / 'config.json'}: required key {exc} is missing") from None
    except ValueError as exc:
        raise ModelLoadError(f"{folder / 'config.json'}: {exc}") from None


def _token_string(value):
    # tokenizer_config.json writes special tokens as "<s>" or {"content": "<s>", ...}
    return value.get("content") if isinstance(value, dict) else value


def read_tokenizer(folder: Path, config: ModelConfig) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ModelLoadError(f"{folder}: tokenizer.json is missing")
    try:
        backend = Backend.from_file(str(file))
    except Exception as exc:
        raise ModelLoadError(f"{file}: cannot read tokenizer ({exc})") from exc
    meta = _optional_json(folder / "tokenizer_config.json")
    template = meta.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    bos_token, eos_token = _token_string(meta.get("bos_token")), _token_string(meta.get("eos_token"))
    eos_ids = list(config.eos_token_ids)
    eos_from_tokenizer = backend.token_to_id(eos_token) if eos_token else None
    if eos_from_tokenizer is not None and eos_from_tokenizer not in eos_ids:
        eos_ids.append(eos_from_tokenizer)
    bos_id = config.bos_token_id if config.bos_token_id is not None else (backend.token_to_id(bos_token) if bos_token else None)
    # tokenizer.json's post-processor adds BOS itself when the model wants one.
    return Tokenizer(backend, eos_ids, bos_token_id=bos_id, chat_template=template, add_bos=False,
                     bos_token=bos_token, eos_token=eos_token)


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index}: shard(s) missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights found (only safetensors checkpoints are supported)")
    return files


def iter_weights(folder: Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every shard."""
    from safetensors import safe_open
    from tqdm import tqdm

    files = weight_files(folder)
    for file in tqdm(files, desc=f"loading {folder.name}", unit="shard", disable=not progress or len(files) < 2, leave=False):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{file}: cannot read safetensors, corrupt or truncated? ({exc})") from exc
