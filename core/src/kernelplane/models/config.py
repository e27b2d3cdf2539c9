"""A model's architecture facts, whatever file format they came from."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

from ..capabilities import AttentionRequest


class ModelConfig(BaseModel):
    architecture: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: list[int] = Field(default_factory=list)

    def attention_request(self, dtype: str = "bfloat16", kv_cache_format: str = "auto", block_size: int = 16) -> AttentionRequest:
        return AttentionRequest(kind="mha", num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                head_dim=self.head_dim, dtype=dtype, kv_cache_format=kv_cache_format,
                                block_size=block_size, causal=True)
