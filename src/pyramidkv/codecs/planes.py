"""3-bit codes in planes: a byte layout the CUDA decode kernel cuts into int8 registers with two shifts and two masks.

In the stream layout (:mod:`.packing`) a 3-bit code starts at every bit offset of a byte in turn, so putting four
codes into the four bytes of an int8 register (an operand of ``mma.m16n8k32.s8``) takes a different shift per
code. Planes store the low 2 bits and the high bit of each code apart, each where its register needs it
(docs/kernels.md, section 2):

* A vector's d coordinates form 4 chunks of d / 4, one per lane of the quad that reads one key in the kernel;
  chunk t is bytes [t 3d/32, (t + 1) 3d/32).
* Coordinate c = 16 w + 4 i + j of a chunk (w < d / 64; i, j < 4) is byte i of the chunk's register m = 4 w + j.
* Its low 2 bits are bits 2j .. 2j + 1 of the chunk's byte 4 w + i: the chunk's first d / 16 bytes are the 2-bit
  stream of its low bits, and register m's low bits are ``(word w >> 2 j) & 0x03030303``, as for 2-bit codes.
* Its high bit is bit R i + m of the chunk's last d / 32 bytes read as one little-endian integer (R = d / 16
  registers per chunk). At d = 128 (R = 8) byte i of that word holds bit m of register m's byte i, so the
  register's high bits are ``(word >> (m - 2)) & 0x04040404``; at d = 64 the 16 bits are first spread a nibble
  per byte (4 operations per key).

The bytes are as many as the stream's (3d / 8); only their order differs. d must be a multiple of 64.
"""

from __future__ import annotations

import torch

from pyramidkv.checks import check_int
from pyramidkv.codecs.packing import check_indices
from pyramidkv.errors import PyramidKVError

BITS = 3  # bits per code that planes hold
ALIGN = 64  # head dims planes take: 4 chunks of whole 16-coordinate groups


def check_dim(d: int, name: str = "d") -> None:
    """Raise, naming ``name``, unless ``d`` is a head dim planes lay out (a positive multiple of ``ALIGN``)."""
    if check_int(name, d, ALIGN) % ALIGN:
        raise PyramidKVError(
            f"{name}: planes need a head dim that is a multiple of {ALIGN}, got {d!r}"
        )


def plane_bytes(d: int) -> int:
    """Bytes of one vector's codes in planes: 3d / 8, the stream's."""
    check_dim(d)
    return BITS * d // 8


def pack_planes(indices: torch.Tensor, d: int, check: bool = True) -> torch.Tensor:
    """3-bit ``indices[..., d]`` into ``uint8[..., 3d/8]`` laid out in planes. ``check=False`` skips the host read
    of the range check, as :func:`.packing.pack_bits` does for CUDA graphs."""
    check_dim(d)
    check_indices(indices, BITS, check)
    if indices.shape[-1] != d:
        raise PyramidKVError(
            f"indices must end in a dimension of {d}, got shape {tuple(indices.shape)}"
        )
    lead, chunk, device = indices.shape[:-1], d // 4, indices.device
    codes = indices.reshape(-1, 4, chunk).long()
    rows = codes.shape[0]
    low = (codes & 3).reshape(rows, 4, chunk // 4, 4)
    low_bytes = (low << torch.arange(0, 8, 2, device=device)).sum(-1)
    # (w, i, j) -> (i, w, j): position R i + 4 w + j of the high bits
    high = (
        (codes >> 2)
        .reshape(rows, 4, chunk // 16, 4, 4)
        .transpose(2, 3)
        .reshape(rows, 4, chunk // 8, 8)
    )
    high_bytes = (high << torch.arange(8, device=device)).sum(-1)
    packed = torch.cat([low_bytes, high_bytes], dim=-1).to(torch.uint8)
    return packed.reshape(*lead, plane_bytes(d))


def unpack_planes(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: ``uint8[..., 3d/8]`` back to ``int64[..., d]``."""
    nbytes = plane_bytes(d)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got dtype {packed.dtype}")
    if packed.dim() == 0 or packed.shape[-1] != nbytes:
        raise PyramidKVError(
            f"packed must end in a dimension of {nbytes} bytes for d={d}, got shape {tuple(packed.shape)}"
        )
    chunk, device = d // 4, packed.device
    parts = packed.reshape(-1, 4, nbytes // 4).long()
    rows = parts.shape[0]
    low = (parts[..., : chunk // 4, None] >> torch.arange(0, 8, 2, device=device)) & 3
    high = (parts[..., chunk // 4 :, None] >> torch.arange(8, device=device)) & 1
    high = high.reshape(rows, 4, 4, chunk // 16, 4).transpose(2, 3)  # (i, w, j) -> (w, i, j)
    codes = low.reshape(rows, 4, chunk) | (high.reshape(rows, 4, chunk) << 2)
    return codes.reshape(*packed.shape[:-1], d)
