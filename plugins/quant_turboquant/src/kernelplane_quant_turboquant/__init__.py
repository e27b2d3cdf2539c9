"""TurboQuant KV-cache formats (2/3/4 bits) and fused attention for kernelplane."""
from .codebook import Codebook, codebook_for, gaussian_codebook, sphere_codebook
from .codec import TurboQuantCodec
from .quantizer import FORMAT_BITS, TurboQuantKVQuantizer

__all__ = ["Codebook", "FORMAT_BITS", "TurboQuantCodec", "TurboQuantKVQuantizer", "codebook_for",
           "gaussian_codebook", "sphere_codebook"]
