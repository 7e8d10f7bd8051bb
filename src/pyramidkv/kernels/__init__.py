"""Attention over a compressed cache: a torch reference (any device) and fused Triton kernels."""

from pyramidkv.kernels.dispatch import KERNELS, check_kernel, fused_attention, use_fused
from pyramidkv.kernels.reference import chunked_attention

__all__ = ["KERNELS", "check_kernel", "chunked_attention", "fused_attention", "use_fused"]
