"""Attention over a compressed cache: a torch reference (any device) and, on CUDA, fused Triton kernels."""

from .reference import chunked_attention

__all__ = ["chunked_attention"]
