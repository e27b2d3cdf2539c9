"""The four kernel capabilities and the typed request each one is selected for.

A request says what the model needs, never which implementation to use; a
provider's ``supports`` reads it and answers yes or no with a reason.
"""
from __future__ import annotations

import enum
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Capability(str, enum.Enum):
    ATTENTION = "attention"
    KV_QUANTIZER = "kv_quantizer"
    MOE = "moe"
    SPEC_PROPOSER = "spec_proposer"

    @property
    def env_var(self) -> str:
        """The environment variable that overrides selection for this capability."""
        return f"KERNELPLANE_{self.value.upper()}_BACKEND"


DType = Literal["float32", "float16", "bfloat16"]

# Cache formats that store K/V unquantized, in the named dtype.
PLAIN_KV_FORMATS = ("float32", "float16", "bfloat16")


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AttentionRequest(_Request):
    """What a model's attention layers need from a backend.

    ``kind="mha"`` covers MHA, GQA and MQA (``num_kv_heads`` divides
    ``num_heads``). ``kind="mla"`` is DeepSeek multi-head latent attention in
    its absorbed form: one latent K of ``head_dim`` (e.g. 512 + 64) shared by
    all heads, and V = the first ``head_dim_v`` channels of that latent.
    """

    kind: Literal["mha", "mla"] = "mha"
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0, description="query/key head dim")
    head_dim_v: Optional[int] = Field(default=None, gt=0, description="value head dim; None means head_dim")
    dtype: DType = "bfloat16"
    kv_cache_format: str = Field(default="auto", description="'auto' (same as dtype), a plain dtype, or a quantized format such as 'int8' or 'turboquant3'")
    block_size: int = Field(default=16, gt=0, description="tokens per KV-cache page")
    causal: bool = True
    sliding_window: Optional[int] = Field(default=None, gt=0)
    scale: Optional[float] = Field(default=None, description="softmax scale; None means 1/sqrt(head_dim)")

    @model_validator(mode="after")
    def _check(self) -> "AttentionRequest":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.kind == "mla" and self.num_kv_heads != 1:
            raise ValueError("MLA stores one latent KV head: num_kv_heads must be 1")
        return self

    @property
    def v_dim(self) -> int:
        return self.head_dim_v or self.head_dim

    @property
    def resolved_kv_format(self) -> str:
        return self.dtype if self.kv_cache_format == "auto" else self.kv_cache_format

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim ** -0.5


class KVQuantRequest(_Request):
    """A KV-cache format to store: ``format`` names it (e.g. 'int8', 'fp8', 'turboquant3')."""

    format: str
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    head_dim_v: Optional[int] = Field(default=None, gt=0)
    kind: Literal["mha", "mla"] = "mha"
    dtype: DType = Field(default="bfloat16", description="dtype of the K/V written and of the dequantized output")
    block_size: int = Field(default=16, gt=0)
    group_size: Optional[int] = Field(default=None, gt=0, description="channels sharing one scale; None = whole head")

    @property
    def v_dim(self) -> int:
        return self.head_dim_v or self.head_dim


class MoERequest(_Request):
    num_experts: int = Field(gt=0)
    top_k: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    activation: Literal["silu", "gelu"] = "silu"
    dtype: DType = "bfloat16"

    @model_validator(mode="after")
    def _check(self) -> "MoERequest":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        return self


class SpecRequest(_Request):
    """Speculative decoding: ``method`` names the proposer family (e.g. 'ngram', 'mtp')."""

    method: str
    num_speculative_tokens: int = Field(default=3, gt=0, le=64)
    options: dict = Field(default_factory=dict, description="method-specific settings, e.g. prompt_lookup_min/max for ngram")


REQUEST_TYPES = {
    Capability.ATTENTION: AttentionRequest,
    Capability.KV_QUANTIZER: KVQuantRequest,
    Capability.MOE: MoERequest,
    Capability.SPEC_PROPOSER: SpecRequest,
}
