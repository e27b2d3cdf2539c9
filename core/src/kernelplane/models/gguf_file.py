"""Reading a llama.cpp GGUF file: config, dequantized weights, tokenizer.

Weights come out under Hugging Face names, in Hugging Face's layout: for the
``llama`` architecture llama.cpp stores the rows of ``attn_q``/``attn_k``
permuted for its interleaved rotary, and we undo that here.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import ModelConfig
from .errors import ModelLoadError

log = logging.getLogger("kernelplane")

# GGUF tensor names -> Hugging Face names (per layer: blk.{i}.X -> model.layers.{i}.Y).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_FOLDED_INTO_CONFIG = {"rope_freqs.weight"}  # read by read_config, not a weight

# Pre-tokenizer split rules by ``tokenizer.ggml.pre`` (the regexes of the
# original Hugging Face tokenizers). None: GPT-2's rule, which the ByteLevel
# pre-tokenizer applies itself.
_GPT2 = None
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# name -> (split regex, split digits one by one first, NFC-normalize)
_PRE_TOKENIZERS = {
    "gpt2": (_GPT2, False, False), "gpt-2": (_GPT2, False, False), "default": (_GPT2, False, False),
    "smollm": (_GPT2, True, False), "starcoder": (_GPT2, True, False), "refact": (_GPT2, True, False),
    "llama-bpe": (_LLAMA3, False, False), "llama3": (_LLAMA3, False, False), "smaug-bpe": (_LLAMA3, False, False),
    "qwen2": (_QWEN2, False, True),
}
# GGUF token types that match whole and are never split by BPE.
_CONTROL, _USER_DEFINED = 3, 4


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file, corrupt or truncated? ({type(exc).__name__}: {exc})") from exc


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _tensor(reader, name: str):
    return next((t for t in reader.tensors if t.name == name), None)


def read_config(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    def need(key):
        value = get(key)
        if value is None:
            raise ModelLoadError(f"{path}: metadata key {arch}.{key} is missing")
        return value

    if (get("expert_count") or 0) > 0:
        raise ModelLoadError(f"{path}: mixture-of-experts {arch} models are not supported")
    heads, hidden = int(need("attention.head_count")), int(need("embedding_length"))
    head_dim = int(get("attention.key_length") or hidden // heads)
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ModelLoadError(f"{path}: partial rotary (rope.dimension_count != head dim) is not supported")
    names = {t.name for t in reader.tensors}
    facts = dict(
        architecture=arch,
        vocab_size=int(get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens") or [])),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch, path),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        attention_output_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(reader),
    )
    try:
        return ModelConfig(**facts)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ModelLoadError(f"{path}: invalid model metadata: {exc}") from None


def _eos_ids(reader) -> list[int]:
    ids = []
    # eot: end of turn, e.g. Llama 3's <|eot_id|>; chat models stop on either.
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        value = _field(reader, key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def _rope_scaling(reader, arch: str, path: Path):
    kind = _field(reader, f"{arch}.rope.scaling.type")
    freqs = _tensor(reader, "rope_freqs.weight")
    if freqs is not None:
        # Llama 3.1-style scaling, baked by the converter into one divisor per frequency.
        return {"rope_type": "freq_factors", "factors": [float(x) for x in np.asarray(freqs.data, dtype=np.float32)]}
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    raise ModelLoadError(f"{path}: rope scaling {kind!r} is not supported (linear, llama3)")


def undo_rope_permutation(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp stores each head's rows as interleaved (re, im) pairs;
    # Hugging Face keeps [first half, second half] (rotate-half layout).
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str):
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        return f"model.layers.{layer}.{_LAYER_NAMES[rest]}" if rest in _LAYER_NAMES else None
    return _GLOBAL_NAMES.get(gguf_name)


def iter_weights(reader, config: ModelConfig, path: Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every weight the model uses."""
    import gguf
    from tqdm import tqdm

    for t in tqdm(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor", disable=not progress, leave=False):
        if t.name in _FOLDED_INTO_CONFIG:
            continue
        name = _hf_name(t.name)
        if name is None:  # dropping it silently could give a wrong model
            raise ModelLoadError(f"{path}: tensor {t.name} has no place in the {config.architecture} model")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            w = np.asarray(w, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        except Exception as exc:
            raise ModelLoadError(f"{path}: tensor {t.name} ({t.tensor_type.name}) cannot be read, "
                                 f"corrupt or truncated file? ({type(exc).__name__}: {exc})") from exc
        if config.architecture == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            w = undo_rope_permutation(w, config.num_heads if ".attn_q." in t.name else config.num_kv_heads)
        w = np.ascontiguousarray(w)
        yield name, torch.from_numpy(w if w.flags.writeable else w.copy())  # float32 tensors are read-only file views


def build_tokenizer(reader, path: Path):
    """A byte-level BPE ``tokenizers`` object from the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from .tokenizer import Tokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(f"{path}: tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre == "default":
        log.warning("%s: no pre-tokenizer named (tokenizer.ggml.pre=%r); assuming GPT-2's split rule", path, pre)
    if pre not in _PRE_TOKENIZERS:
        raise ModelLoadError(f"{path}: pre-tokenizer {pre!r} is not supported ({', '.join(sorted(_PRE_TOKENIZERS))})")
    split, digits, nfc = _PRE_TOKENIZERS[pre]
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)

    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    if nfc:
        backend.normalizer = normalizers.NFC()
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, kind in enumerate(types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, kind in enumerate(types) if kind == _USER_DEFINED])

    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return Tokenizer(backend, _eos_ids(reader), bos_token_id=int(bos) if bos is not None else None,
                     chat_template=_field(reader, "tokenizer.chat_template"),
                     add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)))
