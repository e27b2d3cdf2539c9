"""The TurboQuant KV-cache formats: ``turboquant2``, ``turboquant3``, ``turboquant4``.

Each K and V vector (one token, one KV head) is stored as a float16 norm and
``head_dim * bits / 8`` bytes of packed codes (``codec.TurboQuantCodec``).
Per layer the pages hold four tensors, each presented with the layout's
leading dims ``[num_blocks, block_size, num_kv_heads, ...]`` but stored
head-major within a page (``[num_blocks, num_kv_heads, block_size, ...]``,
permuted): a kernel reading one KV head of a page reads one contiguous run
of codes and one contiguous run of norms.

- ``key_codes`` / ``value_codes``: uint8 ``[..., packed bytes]``
- ``key_norm`` / ``value_norm``: float16 ``[...]`` (no trailing dim)

Quantization is on write; ``dequantize`` is the reference path.
"""
from __future__ import annotations

from typing import Optional

import torch

from kernelplane import KVPages, KVQuantRequest
from kernelplane.kv_cache import torch_dtype

from .codec import NORM_DTYPE, TurboQuantCodec

FORMAT_BITS = {"turboquant2": 2, "turboquant3": 3, "turboquant4": 4}
# The rotation's seed is a fixed function of the plane and the dim: caches
# written by one process can be read by another.
_SEED = {"key": 0x7C5A_0001, "value": 0x7C5A_0002}
DEFAULT_NORM_MODE = "mse"


def format_bits(fmt: str) -> int:
    try:
        return FORMAT_BITS[fmt]
    except KeyError:
        raise ValueError(f"unknown TurboQuant format {fmt!r}: expected one of {', '.join(FORMAT_BITS)}") from None


class TurboQuantKVQuantizer:
    """``KVQuantizer`` for one TurboQuant format and one model's head dims."""

    def __init__(self, request: KVQuantRequest, norm_mode: str = DEFAULT_NORM_MODE):
        if request.kind != "mha":
            raise ValueError("TurboQuant stores separate K and V vectors: MLA latent caches are not supported")
        self.format = request.format
        self.bits = format_bits(request.format)
        self.out_dtype = torch_dtype(request.dtype)
        self.key_codec = TurboQuantCodec(self.bits, request.head_dim, _SEED["key"] + request.head_dim, norm_mode)
        self.value_codec = TurboQuantCodec(self.bits, request.v_dim, _SEED["value"] + request.v_dim, norm_mode)

    def codec(self, plane: str) -> TurboQuantCodec:
        return self.key_codec if plane == "key" else self.value_codec

    def bytes_per_token(self, num_kv_heads: int, head_dim: int, head_dim_v: int) -> float:
        self._check_dims(head_dim, head_dim_v)
        norm_bytes = torch.empty(0, dtype=NORM_DTYPE).element_size()
        return num_kv_heads * (self.key_codec.packed_bytes + self.value_codec.packed_bytes + 2 * norm_bytes)

    def allocate(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, head_dim_v: int,
                 device: torch.device | str) -> KVPages:
        self._check_dims(head_dim, head_dim_v)
        tensors = {}
        for plane in ("key", "value"):
            codec = self.codec(plane)
            codes = torch.zeros(num_blocks, num_kv_heads, block_size, codec.packed_bytes, dtype=torch.uint8, device=device)
            norms = torch.zeros(num_blocks, num_kv_heads, block_size, dtype=NORM_DTYPE, device=device)
            tensors[f"{plane}_codes"] = codes.permute(0, 2, 1, 3)
            tensors[f"{plane}_norm"] = norms.permute(0, 2, 1)
        return KVPages(self.format, block_size, num_kv_heads, head_dim, head_dim_v, tensors, quantizer=self)

    def write(self, pages: KVPages, key: torch.Tensor, value: Optional[torch.Tensor], slot_mapping: torch.Tensor) -> None:
        if value is None:
            raise ValueError("TurboQuant pages need both key and value")
        slots = slot_mapping.long()
        blocks, offsets = slots // pages.block_size, slots % pages.block_size
        for plane, x in (("key", key), ("value", value)):
            if x.dim() != 3 or x.shape[1] != pages.num_kv_heads:
                raise ValueError(f"{plane} must be [tokens, {pages.num_kv_heads}, dim], got {tuple(x.shape)}")
            codes, norms = self.codec(plane).encode(x)
            pages.tensors[f"{plane}_codes"][blocks, offsets] = codes
            pages.tensors[f"{plane}_norm"][blocks, offsets] = norms

    def dequantize(self, pages: KVPages, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for plane in ("key", "value"):
            codes = pages.tensors[f"{plane}_codes"].index_select(0, block_ids)
            norms = pages.tensors[f"{plane}_norm"].index_select(0, block_ids)
            out.append(self.codec(plane).decode(codes, norms))
        return out[0], out[1]

    def _check_dims(self, head_dim: int, head_dim_v: int) -> None:
        if (head_dim, head_dim_v) != (self.key_codec.dim, self.value_codec.dim):
            raise ValueError(f"this {self.format} quantizer was built for head dims {self.key_codec.dim}/"
                             f"{self.value_codec.dim}, asked for {head_dim}/{head_dim_v}")
