"""Reference KV-cache quantizers: round-to-nearest int8 and fp8 (e4m3) with
one float32 scale per token and head (absmax / qmax)."""
from __future__ import annotations

from typing import Optional

import torch

from ..capabilities import KVQuantRequest
from ..kv_cache import KVPages, torch_dtype

_FORMATS = {
    "int8": (torch.int8, 127.0),
    "fp8": (getattr(torch, "float8_e4m3fn", None), 448.0),
}


class RoundToNearestKVQuantizer:
    """Per-token, per-head absmax scaling; values rounded to the nearest code."""

    def __init__(self, request: KVQuantRequest):
        self.format = request.format
        self.storage_dtype, self.qmax = _FORMATS[request.format]
        self.out_dtype = torch_dtype(request.dtype)
        self.mla = request.kind == "mla"

    def bytes_per_token(self, num_kv_heads: int, head_dim: int, head_dim_v: int) -> float:
        dims = head_dim + (0 if self.mla else head_dim_v)
        planes = 1 if self.mla else 2
        return num_kv_heads * (dims * 1 + planes * 4)

    def allocate(self, num_blocks, block_size, num_kv_heads, head_dim, head_dim_v, device) -> KVPages:
        t = {
            "key": torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=self.storage_dtype, device=device),
            "key_scale": torch.empty(num_blocks, block_size, num_kv_heads, 1, dtype=torch.float32, device=device),
        }
        if not self.mla:
            t["value"] = torch.empty(num_blocks, block_size, num_kv_heads, head_dim_v, dtype=self.storage_dtype, device=device)
            t["value_scale"] = torch.empty(num_blocks, block_size, num_kv_heads, 1, dtype=torch.float32, device=device)
        return KVPages(self.format, block_size, num_kv_heads, head_dim, head_dim_v, t, mla=self.mla, quantizer=self)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / self.qmax
        y = x / scale
        if self.storage_dtype == torch.int8:
            y = y.round().clamp(-self.qmax, self.qmax)
        return y.to(self.storage_dtype), scale

    def _write_plane(self, pages: KVPages, name: str, x: torch.Tensor, slots: torch.Tensor) -> None:
        q, scale = self.quantize(x)
        codes = pages.tensors[name]
        if codes.element_size() == 1:  # fp8 has no index_copy on every device: copy its bytes
            codes, q = codes.view(torch.uint8), q.view(torch.uint8)
        codes.view(-1, *codes.shape[2:]).index_copy_(0, slots, q)
        scales = pages.tensors[name + "_scale"]
        scales.view(-1, *scales.shape[2:]).index_copy_(0, slots, scale)

    def write(self, pages: KVPages, key: torch.Tensor, value: Optional[torch.Tensor], slot_mapping: torch.Tensor) -> None:
        self._write_plane(pages, "key", key, slot_mapping)
        if not self.mla:
            self._write_plane(pages, "value", value, slot_mapping)

    def dequantize(self, pages: KVPages, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def plane(name):
            return pages.tensors[name].index_select(0, block_ids).float() * pages.tensors[name + "_scale"].index_select(0, block_ids)

        k = plane("key")
        v = k[..., : pages.head_dim_v] if self.mla else plane("value")
        return k, v


def available_formats() -> list[str]:
    return [name for name, (dtype, _) in _FORMATS.items() if dtype is not None]
