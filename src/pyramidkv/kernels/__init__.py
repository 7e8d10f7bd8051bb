"""Attention over a compressed cache: fused kernels (CUDA and Triton) on codes, and their torch references.

One job per module: :mod:`.dispatch` (which path a layer takes), :mod:`.plan` (tuning, split, workspace),
:mod:`.triton_decode` and :mod:`.cuda_decode` (the decode kernels), :mod:`.epilogue` and :mod:`.merge`
(merging splits), :mod:`.encode`, :mod:`.ring_commit`, :mod:`.reference` (torch). docs/kernels.md describes
them.
"""

from pyramidkv.kernels.dispatch import KERNELS, check_kernel, fused_attention, fused_rows, use_fused
from pyramidkv.kernels.reference import chunked_attention

__all__ = [
    "KERNELS",
    "check_kernel",
    "chunked_attention",
    "fused_attention",
    "fused_rows",
    "use_fused",
]
