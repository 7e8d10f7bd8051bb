"""The common interface of the codecs: ``encode`` a tensor to packed codes, ``decode`` it back.

A codec turns ``x[..., d]`` into a :class:`Codes` whose tensors are exactly what a cache stores; ``nbytes``
counts those bytes (packed indices, norms, scales), so compression ratios are measured, not estimated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import torch

from pyramidkv.errors import PyramidKVError

FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class Codes:
    """Base of the encoded forms: the tensors a cache holds, plus the dtype to decode to."""

    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes the stored tensors really occupy (every tensor field of the codes)."""
        return sum(
            value.numel() * value.element_size()
            for value in (getattr(self, f.name) for f in fields(self))
            if isinstance(value, torch.Tensor)
        )


class Codec(ABC):
    """``encode(x) -> Codes``, ``decode(codes) -> x_hat``; ``bits_per_coordinate`` is the storage rate."""

    @abstractmethod
    def encode(self, x: torch.Tensor, name: str = "x") -> Codes:
        """Quantize ``x[..., d]`` into packed codes; ``name`` names ``x`` in an error (``"layer 3 keys"``)."""

    @abstractmethod
    def decode(self, codes: Codes, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reconstruct the tensor, in ``dtype`` or else the dtype that was encoded."""

    @abstractmethod
    def bits_per_coordinate(self, include_norm: bool = True) -> float:
        """Stored bits per coordinate; ``include_norm`` adds the per-vector or per-group side information."""


def check_input(x: object, width: int | None = None, name: str = "x") -> torch.Tensor:
    """Reject what no codec can store: a non-tensor, a non-float tensor, a wrong last dimension, NaN or Inf."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or (width is not None and x.shape[-1] != width):
        expected = "at least one dimension" if width is None else f"shape (..., {width})"
        raise PyramidKVError(f"{name} must have {expected}, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise PyramidKVError(f"{name}: got NaN or Inf; only finite values can be encoded")
    return x
