"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over the paged KV cache.

Attention goes through the selected backend (``set_attention_backend``); the
rest is plain PyTorch. Q/K/V and gate/up are fused into single matmuls, and
RoPE rotates q and k together with cos/sin looked up once per step.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kv_cache import AttentionMetadata, KVPages, write_kv
from .config import ModelConfig
from .pointwise import EAGER_OPS, PointwiseOps, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim // 2], with the config's scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind == "freq_factors":
        inv_freq = inv_freq / torch.tensor(scaling["factors"], dtype=torch.float64)
    elif kind not in (None, "default"):
        raise ValueError(f"rope scaling {kind!r} is not supported (linear, llama3)")
    return inv_freq.float()


class Rotary(nn.Module):
    """cos/sin tables for every position (float32), shared by all layers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Derived from the config, never loaded: filled by reset() once the
        # model (built on the meta device) has its weights and device.
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)

    def reset(self, device) -> None:
        """Compute the tables on ``device``."""
        positions = torch.arange(self.config.max_position_embeddings, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, rope_inv_freq(self.config).to(positions.device))
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim // 2] for the given positions."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.attention_output_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.backend = None
        self.ops = EAGER_OPS

    def forward(self, x, cos, sin, pages: KVPages, meta: AttentionMetadata):
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, : self.num_heads]), self.k_norm(qk[:, self.num_heads:])), dim=1)
        q, k = self.ops.apply_rope(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        write_kv(pages, k, v, meta.slot_mapping, meta)
        out = self.backend.forward(q, pages, meta)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.ops = EAGER_OPS

    def forward(self, x):
        return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.ops = EAGER_OPS

    def forward(self, hidden, residual, cos, sin, pages, meta):
        """(output, residual stream): the residual add is deferred into the next norm,
        so each add + RMSNorm pair is one fused op."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            residual, hidden = self.ops.add_rms_norm(residual, hidden, self.input_layernorm.weight,
                                                     self.input_layernorm.eps)
        hidden = self.self_attn(hidden, cos, sin, pages, meta)
        norm = self.post_attention_layernorm
        residual, hidden = self.ops.add_rms_norm(residual, hidden, norm.weight, norm.eps)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    """Parameters are created uninitialized: weights always come from a checkpoint."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Passing the tensor skips Embedding's random init (slow on the meta device).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.rotary = Rotary(config)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.ops = EAGER_OPS

    def use_pointwise_ops(self, ops: PointwiseOps) -> None:
        """Run norms, RoPE and SwiGLU's activation with ``ops`` (eager or fused)."""
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops

    def set_attention_backend(self, backend) -> None:
        """Route every layer's attention through ``backend`` (an ``AttentionBackend``)."""
        for layer in self.layers:
            layer.self_attn.backend = backend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVPages],
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] of the batch's new tokens, after the final norm."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} KV caches (one per layer), got {len(kv_caches)}")
        hidden, residual = self.embed_tokens(input_ids), None
        cos, sin = self.rotary.lookup(positions, hidden.dtype)
        for layer, pages in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, cos, sin, pages, meta)
        if residual is None:  # no layers
            return self.norm(hidden)
        return self.ops.add_rms_norm(residual, hidden, self.norm.weight, self.norm.eps)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] for hidden states [N, hidden]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    @staticmethod
    def fuse_hf_weights(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face-named weights -> this module's state dict (q/k/v and gate/up concatenated).

        Consumes ``weights``; raises KeyError naming a missing or unexpected tensor.
        """
        own = {}
        for i in range(config.num_layers):
            hf, me = f"model.layers.{i}.", f"layers.{i}."

            def take(name):
                return _pop(weights, hf + name)

            own[me + "self_attn.qkv_proj.weight"] = torch.cat([take(f"self_attn.{p}_proj.weight") for p in "qkv"])
            if config.attention_bias:
                own[me + "self_attn.qkv_proj.bias"] = torch.cat([take(f"self_attn.{p}_proj.bias") for p in "qkv"])
            if config.qk_norm:
                own[me + "self_attn.q_norm.weight"] = take("self_attn.q_norm.weight")
                own[me + "self_attn.k_norm.weight"] = take("self_attn.k_norm.weight")
            own[me + "self_attn.o_proj.weight"] = take("self_attn.o_proj.weight")
            if config.attention_output_bias:
                own[me + "self_attn.o_proj.bias"] = take("self_attn.o_proj.bias")
            own[me + "mlp.gate_up_proj.weight"] = torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")])
            own[me + "mlp.down_proj.weight"] = take("mlp.down_proj.weight")
            own[me + "input_layernorm.weight"] = take("input_layernorm.weight")
            own[me + "post_attention_layernorm.weight"] = take("post_attention_layernorm.weight")
        own["embed_tokens.weight"] = _pop(weights, "model.embed_tokens.weight")
        own["norm.weight"] = _pop(weights, "model.norm.weight")
        if not config.tie_word_embeddings:
            own["lm_head.weight"] = _pop(weights, "lm_head.weight")
        elif "lm_head.weight" in weights and torch.equal(weights["lm_head.weight"], own["embed_tokens.weight"]):
            del weights["lm_head.weight"]  # some tied checkpoints store the shared matrix twice
        for name in [n for n in weights if n.endswith("rotary_emb.inv_freq")]:
            del weights[name]  # derived from the config; older checkpoints saved it
        if weights:  # a tensor we do not know would be silently dropped: refuse instead
            raise KeyError(f"tensor(s) the {config.architecture} model has no place for: {', '.join(sorted(weights)[:5])}")
        return own


def _pop(weights: dict, name: str) -> torch.Tensor:
    try:
        return weights.pop(name)
    except KeyError:
        raise KeyError(f"tensor {name!r} is missing from the checkpoint") from None
