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

Three choices beyond the paper's MSE quantizer, all measured on SmolLM2-135M
(see BENCHMARKS.md) and all free at attention time:

- key centering: keys are stored as ``k - mu``, ``mu`` the mean key (per KV
  head) of the first real write into the layer's pages (the engine primes
  its cache with a fixed text at start-up), kept for the pages' lifetime in a
  buffer that CUDA graphs read in place (zeros before that first write;
  writes under ``kv_cache.placeholder_writes()`` never set it). A softmax is
  unchanged when every logit of a query moves by the
  same ``q . mu``, so attention reads the centered codes as they are; only
  ``dequantize`` adds ``mu`` back. Real keys share a large common component
  (55-75 % of their squared norm in SmolLM2), and the quantization error
  scales with the length of what is quantized.
- the stored norm (``codec.NORM_MODES``): ``unbiased`` at 3 and 4 bits,
  ``mse`` at 2 bits.
- the encoder's scale search (``codec.TurboQuantCodec.search_scales``) at 3 and
  4 bits: each vector's codes are those of the scaled copy closest to it in
  direction, which under the unbiased norm is its error. On random unit vectors
  at head dim 64 that error falls by 10 % (3 bits) and 22 % (4 bits); it costs
  only writes. At 2 bits (``mse`` norm) it gains nothing.

Where the engine keeps an exact tail (``kernelplane.exact_tail``: each
running sequence's first and latest tokens unquantized), it holds them in the
codes' space: keys centred and rotated, values rotated (``to_exact_tail``).
The attention kernel then scores the tail with the same rotated query and
accumulates its values in the same rotated output as the codes.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from kernelplane import AttentionMetadata, KVPages, KVQuantRequest
from kernelplane.hardware import probe_hardware
from kernelplane.kv_cache import exact_tail_in_use, torch_dtype, writing_placeholders

from .codec import NORM_DTYPE, TurboQuantCodec

FORMAT_BITS = {"turboquant2": 2, "turboquant3": 3, "turboquant4": 4}

# The rotation's seed is a fixed function of the plane and the dim: caches
# written by one process can be read by another.
_SEED = {"key": 0x7C5A_0001, "value": 0x7C5A_0002}
DEFAULT_NORM_MODE = {2: "mse", 3: "unbiased", 4: "unbiased"}
DEFAULT_SCALE_SEARCH = {2: 1, 3: 16, 4: 16}  # input scales the encoder tries per vector


def format_bits(fmt: str) -> int:
    try:
        return FORMAT_BITS[fmt]
    except KeyError:
        raise ValueError(f"unknown TurboQuant format {fmt!r}: expected one of {', '.join(FORMAT_BITS)}") from None


@dataclass
class _KeyOffset:
    codes: weakref.ref  # the pages' key_codes tensor
    mu: torch.Tensor  # [heads, head_dim] float32, zeros until is_set
    is_set: bool = False


class TurboQuantKVQuantizer:
    """``KVQuantizer`` for one TurboQuant format and one model's head dims."""

    def __init__(self, request: KVQuantRequest, norm_mode: Optional[str] = None, center_keys: bool = True,
                 fused_write: Optional[bool] = None, scale_search: Optional[int] = None,
                 rotation_draw: int = 0):
        """``fused_write``: quantize and store in one Triton kernel (``write_kernel``).
        Default: wherever the rows are CUDA tensors that Triton compiles for
        and the head dims are powers of two (the kernel's tiles), 3.6-16x
        faster per write than the PyTorch path on an H100 (BENCHMARKS.md),
        unless ``KERNELPLANE_TURBOQUANT_FUSED_WRITE=0``. ``scale_search``: input scales the
        encoder tries per vector (default ``DEFAULT_SCALE_SEARCH``, none under the ``mse`` norm).
        ``rotation_draw``: another pair of random rotations (0 is the one every engine uses), to
        measure how much a result owes to the draw; pages must be read with the draw that wrote them."""
        if request.kind != "mha":
            raise ValueError("TurboQuant stores separate K and V vectors: MLA latent caches are not supported")
        self.format = request.format
        self.bits = format_bits(request.format)
        self.out_dtype = torch_dtype(request.dtype)
        norm_mode = norm_mode or DEFAULT_NORM_MODE[self.bits]
        self.center_keys = center_keys
        dims_fit = all(d & (d - 1) == 0 for d in (request.head_dim, request.v_dim))
        if fused_write and not dims_fit:
            raise ValueError(f"the fused write kernel needs head dims that are powers of two, got "
                             f"{request.head_dim}/{request.v_dim}: use fused_write=False")
        self.fused_write = fused_write
        # Decided once: the hardware probe and the environment do not change under a running engine.
        self._fused_by_default = (dims_fit and os.environ.get("KERNELPLANE_TURBOQUANT_FUSED_WRITE") != "0"
                                  and probe_hardware().triton_mode == "compiled")
        search = scale_search or (DEFAULT_SCALE_SEARCH[self.bits] if norm_mode != "mse" else 1)
        draw = 0x10000 * rotation_draw  # well clear of the head dims added to the seeds
        self.key_codec = TurboQuantCodec(self.bits, request.head_dim, _SEED["key"] + request.head_dim + draw,
                                         norm_mode, scale_search=search, role="key")
        self.value_codec = TurboQuantCodec(self.bits, request.v_dim, _SEED["value"] + request.v_dim + draw,
                                           norm_mode, scale_search=search, role="value")
        # Key offsets per layer's pages, found by their key_codes tensor (checked by a weak
        # reference, so a new tensor that reuses a freed one's id never inherits its offset).
        self._key_offsets: dict[int, _KeyOffset] = {}

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
        pages = KVPages(self.format, block_size, num_kv_heads, head_dim, head_dim_v, tensors, quantizer=self)
        self._offset_entry(pages)  # the buffer exists before any CUDA graph is captured
        return pages

    # write() takes the step's metadata and fills the exact tail itself (in the fused kernel on GPUs).
    writes_exact_tail = True

    def write(self, pages: KVPages, key: torch.Tensor, value: Optional[torch.Tensor], slot_mapping: torch.Tensor,
              meta: Optional[AttentionMetadata] = None) -> None:
        if value is None:
            raise ValueError("TurboQuant pages need both key and value")
        slots = slot_mapping.long()
        fused = self.fused_write if self.fused_write is not None else (self._fused_by_default and key.is_cuda)
        tail = pages.exact_tail if meta is not None and exact_tail_in_use(pages, meta) and key.shape[0] else None
        blocks, offsets = (None, None) if fused else (slots // pages.block_size, slots % pages.block_size)
        for plane, x in (("key", key), ("value", value)):
            if x.dim() != 3 or x.shape[1] != pages.num_kv_heads or x.shape[2] != self.codec(plane).dim:
                raise ValueError(f"{plane} must be [tokens, {pages.num_kv_heads}, {self.codec(plane).dim}], "
                                 f"got {tuple(x.shape)}")
            if x.shape[0] == 0:
                continue
            offset = None
            if plane == "key" and self.center_keys:
                # The buffer itself (zeros until set), so a captured graph subtracts whatever it holds.
                offset = self._learn_offset(self._offset_entry(pages), x).mu
            codes, norms = pages.tensors[f"{plane}_codes"], pages.tensors[f"{plane}_norm"]
            if fused:
                from . import write_kernel  # Triton is optional: imported only when used

                write_kernel.launch(self.codec(plane), x, offset, codes, norms, slots, pages.block_size,
                                    tail=getattr(tail, plane) if tail else None,
                                    tail_index=tail.write_index(meta) if tail else None)
                continue
            if offset is not None:
                x = x.float() - offset
            packed, lengths = self.codec(plane).encode(x)
            codes[blocks, offsets] = packed
            norms[blocks, offsets] = lengths
        if tail is not None and not fused:
            tail.write(meta, *self.to_exact_tail(pages, key, value))

    def to_exact_tail(self, pages: KVPages, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the exact tail stores: ``R_k (k - mu)`` and ``R_v v`` (float32, one product each)."""
        offset = self._offset_entry(pages).mu if self.center_keys else None
        k = key.float() - offset if offset is not None else key.float()
        return self._rotated(self.key_codec, k), self._rotated(self.value_codec, value.float())

    def from_exact_tail(self, pages: KVPages, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Back from the tail's space to K/V (the reference path)."""
        k = key.float() @ self.key_codec.rotation.matrix(key.device)
        offset = self.key_offset(pages)
        return (k + offset if offset is not None else k), value.float() @ self.value_codec.rotation.matrix(value.device)

    @staticmethod
    def _rotated(codec: TurboQuantCodec, x: torch.Tensor) -> torch.Tensor:
        return x @ codec.rotation.matrix(x.device).T

    def dequantize(self, pages: KVPages, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for plane in ("key", "value"):
            codes = pages.tensors[f"{plane}_codes"].index_select(0, block_ids)
            norms = pages.tensors[f"{plane}_norm"].index_select(0, block_ids)
            out.append(self.codec(plane).decode(codes, norms))
        offset = self.key_offset(pages)
        if offset is not None:
            out[0] = out[0] + offset
        return out[0], out[1]

    def key_offset(self, pages: KVPages, first_keys: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The offset ``mu [heads, head_dim]`` subtracted from these pages' keys
        (None before the first real write). ``first_keys``: set it from them if
        unset, unless these are placeholder writes."""
        entry = self._offset_entry(pages)
        if first_keys is not None:
            self._learn_offset(entry, first_keys)
        return entry.mu if entry.is_set else None

    @staticmethod
    def _learn_offset(entry: "_KeyOffset", keys: torch.Tensor) -> "_KeyOffset":
        """Set the offset from the first real keys written (never from placeholder writes)."""
        if not entry.is_set and not writing_placeholders():
            entry.mu.copy_(keys.float().mean(dim=0))
            entry.is_set = True
        return entry

    def _offset_entry(self, pages: KVPages) -> "_KeyOffset":
        codes = pages.tensors["key_codes"]
        entry = self._key_offsets.get(id(codes))
        if entry is None or entry.codes() is not codes:
            self._key_offsets = {k: v for k, v in self._key_offsets.items() if v.codes() is not None}
            mu = torch.zeros(pages.num_kv_heads, pages.head_dim, dtype=torch.float32, device=codes.device)
            entry = self._key_offsets[id(codes)] = _KeyOffset(weakref.ref(codes), mu)
        return entry

    def _check_dims(self, head_dim: int, head_dim_v: int) -> None:
        if (head_dim, head_dim_v) != (self.key_codec.dim, self.value_codec.dim):
            raise ValueError(f"this {self.format} quantizer was built for head dims {self.key_codec.dim}/"
                             f"{self.value_codec.dim}, asked for {head_dim}/{head_dim_v}")
