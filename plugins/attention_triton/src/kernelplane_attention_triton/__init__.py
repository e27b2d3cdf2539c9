"""kernelplane-attention-triton: paged attention kernels in Triton.

Importing this package (or its ``plugin`` module) does not import Triton or
torch kernels; they load when the provider's factory runs.
"""
__version__ = "0.1.0"
