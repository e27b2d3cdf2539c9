"""Llama-family decoder (Llama, Qwen2, Qwen3) over the paged KV cache.

Attention goes through the selected backend (``set_attention_backend``); the
rest is plain PyTorch. Q/K/V and gate/up are fused into single matmuls.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kv_cache import AttentionMetadata, KVPages, write_kv
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported (linear, llama3)")
    return inv_freq.float()


class Rotary(nn.Module):
    """cos/sin tables for every position, computed once; rotate-half layout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(config))
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x [T, heads, D]
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: Rotary):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = rotary
        self.backend = None

    def forward(self, x, positions, pages: KVPages, meta: AttentionMetadata):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        write_kv(pages, k, v, meta.slot_mapping)
        out = self.backend.forward(q, pages, meta)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: Rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, positions, pages, meta):
        x = x + self.self_attn(self.input_layernorm(x), positions, pages, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = Rotary(config)
        self.layers = nn.ModuleList(DecoderLayer(config, self.rotary) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def set_attention_backend(self, backend) -> None:
        for layer in self.layers:
            layer.self_attn.backend = backend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVPages],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer, pages in zip(self.layers, kv_caches):
            x = layer(x, positions, pages, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face-named weights, fusing q/k/v and gate/up."""
        own = {}
        for i in range(self.config.num_layers):
            p = f"model.layers.{i}."
            take = lambda n: _pop(weights, p + n)
            own[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat([take("self_attn.q_proj.weight"), take("self_attn.k_proj.weight"), take("self_attn.v_proj.weight")])
            if self.config.attention_bias:
                own[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat([take("self_attn.q_proj.bias"), take("self_attn.k_proj.bias"), take("self_attn.v_proj.bias")])
            if self.config.qk_norm:
                own[f"layers.{i}.self_attn.q_norm.weight"] = take("self_attn.q_norm.weight")
                own[f"layers.{i}.self_attn.k_norm.weight"] = take("self_attn.k_norm.weight")
            own[f"layers.{i}.self_attn.o_proj.weight"] = take("self_attn.o_proj.weight")
            own[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")])
            own[f"layers.{i}.mlp.down_proj.weight"] = take("mlp.down_proj.weight")
            own[f"layers.{i}.input_layernorm.weight"] = take("input_layernorm.weight")
            own[f"layers.{i}.post_attention_layernorm.weight"] = take("post_attention_layernorm.weight")
        own["embed_tokens.weight"] = _pop(weights, "model.embed_tokens.weight")
        own["norm.weight"] = _pop(weights, "model.norm.weight")
        if self.lm_head is not None:
            own["lm_head.weight"] = _pop(weights, "lm_head.weight")
        self.load_own_state_dict(own)

    def load_own_state_dict(self, own: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise KeyError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _pop(weights: dict, name: str) -> torch.Tensor:
    try:
        return weights.pop(name)
    except KeyError:
        raise KeyError(f"tensor {name!r} missing from the checkpoint") from None
