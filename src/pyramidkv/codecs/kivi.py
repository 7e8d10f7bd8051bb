"""KIVI-style asymmetric integer quantization (Liu et al. 2024, "KIVI", arXiv 2402.02750).

Keys have outlier channels, so KIVI quantizes them per channel (``axis="channel"``: each channel, over a group
of ``group`` consecutive tokens, shares one scale and zero-point); values are quantized per token
(``axis="token"``: each token, over a group of ``group`` consecutive channels). A group stores
q = round((x - min) / scale) in ``bits`` bits with scale = (max - min) / (2^bits - 1), and scale and min in
fp16. A partial last group is padded with its last element (which changes neither min nor max) and cropped
on decode. KIVI's full-precision window of recent tokens belongs to the cache, not to this codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pyramidkv.checks import check_int
from pyramidkv.codecs.base import FP16_MAX, Codec, Codes, check_input
from pyramidkv.codecs.packing import pack_bits, unpack_bits
from pyramidkv.errors import PyramidKVError

AXES = ("channel", "token")


@dataclass(frozen=True)
class GroupCodes(Codes):
    """``packed uint8[..., groups, bytes]`` of the quantization axis moved last; fp16 ``scale`` and ``zero``
    ``[..., groups]``; ``length`` is that axis' size before padding to whole groups."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    length: int


@dataclass
class KIVI(Codec):
    """KIVI codec. ``axis="channel"`` (keys) encodes ``x[..., seq, d]`` grouping tokens; ``axis="token"``
    (values) encodes ``x[..., d]`` grouping channels. bits: 1..8 (KIVI uses 2 and 4); group: size >= 1."""

    bits: int = 2
    group: int = 32
    axis: Literal["channel", "token"] = "channel"

    def __post_init__(self) -> None:
        check_int("bits", self.bits, 1, 8)
        check_int("group", self.group, 1)
        if self.axis not in AXES:
            raise PyramidKVError(
                f"axis must be one of {AXES} (keys: 'channel', values: 'token'), got {self.axis!r}"
            )

    def bits_per_coordinate(self, include_norm: bool = True) -> float:
        """``bits``, plus 32 / group for each group's fp16 scale and zero-point (the side information)."""
        return self.bits + (32 / self.group if include_norm else 0.0)

    def _to_groups(self, x: torch.Tensor) -> torch.Tensor:
        moved = x.transpose(-1, -2) if self.axis == "channel" else x
        pad = -moved.shape[-1] % self.group
        if pad:
            moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
        return moved.reshape(*moved.shape[:-1], -1, self.group)

    def encode(self, x: torch.Tensor, name: str = "x") -> GroupCodes:
        """Quantize ``x``; for ``axis="channel"`` the last two dimensions are (tokens, channels)."""
        x = check_input(x, name=name)
        if self.axis == "channel" and x.dim() < 2:
            raise PyramidKVError(
                f"x must have shape (..., seq, d) for axis='channel', got {tuple(x.shape)}"
            )
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        groups = self._to_groups(x.to(compute))
        low, high = groups.amin(-1), groups.amax(-1)
        levels = (1 << self.bits) - 1
        scale, zero = ((high - low) / levels).to(torch.float16), low.to(torch.float16)
        if bool(torch.isinf(scale).any() or torch.isinf(zero).any()):
            raise PyramidKVError(
                f"x has values beyond the fp16 range ({FP16_MAX:g}) its scales and zero-points are "
                "stored in; scale the input down"
            )
        step, tiny = scale.to(compute).unsqueeze(-1), torch.finfo(compute).tiny
        ratio = (groups - zero.to(compute).unsqueeze(-1)) / step.clamp_min(tiny)
        q = torch.where(step > 0, ratio.round(), torch.zeros_like(ratio)).clamp(0, levels).long()
        length = x.shape[-2] if self.axis == "channel" else x.shape[-1]
        return GroupCodes(
            dtype=x.dtype, packed=pack_bits(q, self.bits), scale=scale, zero=zero, length=length
        )

    def decode(self, codes: GroupCodes, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``q * scale + zero``, cropped to the encoded length, axes restored, in ``dtype`` (default: encoded)."""
        if not isinstance(codes, GroupCodes):
            raise TypeError(
                f"codes must be GroupCodes from KIVI.encode(), got {type(codes).__name__}"
            )
        dtype = codes.dtype if dtype is None else dtype
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        q = unpack_bits(codes.packed, self.bits, self.group).to(compute)
        values = q * codes.scale.to(compute).unsqueeze(-1) + codes.zero.to(compute).unsqueeze(-1)
        values = values.flatten(-2)[..., : codes.length]
        return (values.transpose(-1, -2) if self.axis == "channel" else values).to(dtype)
