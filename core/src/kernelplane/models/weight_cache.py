"""On-disk cache of converted GGUF models, so only the first start dequantizes.

One folder per source file under ``$KERNELPLANE_CACHE_DIR/models`` (default
``~/.cache/kernelplane/models``), named after the file and a hash of its
resolved path, size and modification time: editing or replacing the GGUF
starts a fresh entry. It holds ``model.json`` (config and tokenizer fields),
``tokenizer.json`` and one ``weights-<dtype>.safetensors`` per dtype, in the
model's own (fused) layout. Writes are atomic; an unreadable entry is
rebuilt, never fatal.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from .config import ModelConfig
from .tokenizer import Tokenizer

log = logging.getLogger("kernelplane")

FORMAT_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("KERNELPLANE_CACHE_DIR") or Path.home() / ".cache" / "kernelplane")


class ConvertedModelCache:
    def __init__(self, source: Path):
        st = source.stat()
        key = f"{FORMAT_VERSION}|{source.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        self.folder = cache_dir() / "models" / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        self.source = source

    def weights_file(self, dtype: str) -> Path:
        return self.folder / f"weights-{dtype}.safetensors"

    def read_metadata(self) -> Optional[tuple[ModelConfig, Tokenizer]]:
        try:
            meta = json.loads((self.folder / "model.json").read_text())
            tokenizer = Tokenizer.from_saved((self.folder / "tokenizer.json").read_text(), meta["tokenizer"])
            return ModelConfig(**meta["config"]), tokenizer
        except FileNotFoundError:
            return None
        except Exception as exc:
            log.warning("ignoring unreadable model cache %s: %s", self.folder, exc)
            return None

    def read_weights(self, dtype: str, device: str) -> Optional[dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        file = self.weights_file(dtype)
        if not file.is_file():
            return None
        try:
            return load_file(str(file), device=str(device))
        except Exception as exc:
            log.warning("ignoring unreadable cached weights %s: %s", file, exc)
            return None

    def discard(self) -> None:
        """Remove this entry (every dtype)."""
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)

    def write(self, config: ModelConfig, tokenizer: Tokenizer, weights: dict[str, torch.Tensor], dtype: str) -> None:
        from safetensors.torch import save_file

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            meta = {"format_version": FORMAT_VERSION, "source": str(self.source),
                    "config": config.model_dump(), "tokenizer": tokenizer.metadata()}
            _write_atomic(self.folder / "tokenizer.json", lambda tmp: tmp.write_text(tokenizer.backend.to_str()))
            _write_atomic(self.folder / "model.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
            tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
            _write_atomic(self.weights_file(dtype), lambda tmp: save_file(tensors, str(tmp)))
        except Exception as exc:  # a read-only or full disk costs speed, not the load
            log.warning("could not cache the converted model in %s: %s", self.folder, exc)


def _write_atomic(target: Path, write) -> None:
    # Readers never see a half-written file, and concurrent writers do not clash.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
