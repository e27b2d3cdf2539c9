"""A model's architecture facts, whatever file format they came from."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

from ..capabilities import AttentionRequest


class ModelConfig(BaseModel):
    """Llama-family decoder shape and special tokens.

    ``rope_scaling`` follows Hugging Face's dict (``rope_type`` "linear" or
    "llama3" with their keys), plus ``{"rope_type": "freq_factors",
    "factors": [...]}`` for GGUF files that store per-frequency divisors.
    """

    architecture: str = "llama"
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    max_position_embeddings: int = Field(default=2048, gt=0)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2; Llama's attention_bias)
    attention_output_bias: bool = False  # o_proj carries a bias (Llama's attention_bias, not Qwen2's)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: Optional[int] = None  # every layer attends to the last N tokens (Mistral v0.1)
    bos_token_id: Optional[int] = None
    eos_token_ids: list[int] = Field(default_factory=list)

    def attention_request(self, dtype: str = "bfloat16", kv_cache_format: str = "auto", block_size: int = 16) -> AttentionRequest:
        return AttentionRequest(kind="mha", num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                head_dim=self.head_dim, dtype=dtype, kv_cache_format=kv_cache_format,
                                block_size=block_size, causal=True, sliding_window=self.sliding_window)
