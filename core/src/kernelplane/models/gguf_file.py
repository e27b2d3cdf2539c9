"""Reading a llama.cpp GGUF file: config, dequantized weights, tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import ModelConfig
from .errors import ModelLoadError

# GGUF tensor names -> Hugging Face names (per layer names use {i}).
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
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_config(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    get = lambda k, d=None: _field(reader, f"{arch}.{k}", d)
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    return ModelConfig(
        architecture=arch,
        vocab_size=int(get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length") or hidden // heads),
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
    )


def _undo_rope_permutation(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp stores Llama's Q/K rows with each head's two rotary halves
    # interleaved; Hugging Face keeps them as [first half, second half].
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_weights(reader, config: ModelConfig, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every tensor in the file."""
    import gguf
    from tqdm import tqdm

    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress, leave=False):
        if t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            if rest not in _LAYER_NAMES:
                continue  # e.g. rope_freqs: recomputed from the config
            name = f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
        elif t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        else:
            continue
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise ModelLoadError(f"tensor {t.name}: cannot dequantize {t.tensor_type.name} ({exc})") from exc
        expected = tuple(int(x) for x in reversed(t.shape))
        w = np.asarray(w, dtype=np.float32).reshape(expected)
        if config.architecture == "llama" and rest_is(t.name, "attn_q.weight", "attn_q.bias"):
            w = _undo_rope_permutation(w, config.num_heads)
        elif config.architecture == "llama" and rest_is(t.name, "attn_k.weight", "attn_k.bias"):
            w = _undo_rope_permutation(w, config.num_kv_heads)
        yield name, torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy


def rest_is(name: str, *suffixes: str) -> bool:
    return any(name.endswith("." + s) for s in suffixes)


def build_tokenizer(reader, path: Path):
    """A `tokenizers` BPE tokenizer from the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from .tokenizer import Tokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(f"{path}: tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]  # GPT-2's split regex
    if _field(reader, "tokenizer.ggml.pre") in ("smollm", "starcoder"):
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens match whole, never split by BPE.
    specials = [AddedToken(tokens[i], special=(types[i] == 3), normalized=False) for i in range(len(tokens)) if types[i] in (3, 4)]
    backend.add_special_tokens([s for s in specials if s.special])
    backend.add_tokens([s for s in specials if not s.special])
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    return Tokenizer(backend, eos_ids, bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
                     chat_template=_field(reader, "tokenizer.chat_template"),
                     add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)))
