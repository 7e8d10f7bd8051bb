"""Bit-packing of codebook indices into uint8 tensors, lossless for every width from 1 to 16 bits.

Layout (the fused attention kernel reads it): the ``count`` indices of one vector form a little-endian bit
stream, index ``j`` in bits ``[j * bits, (j + 1) * bits)`` with its least significant bit first, and stream
bit ``t`` is bit ``t % 8`` of byte ``t // 8``. Each vector is padded to whole bytes, so a vector's codes
sit at a fixed address: ``packed_bytes(count, bits)`` bytes per vector, random access.
"""

from __future__ import annotations

import math

import torch

from pyramidkv.checks import check_int
from pyramidkv.errors import PyramidKVError

MAX_BITS = 16


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that ``count`` indices of ``bits`` bits each occupy once packed (rounded up to a byte)."""
    check_int("bits", bits, 1, MAX_BITS)
    return (count * bits + 7) // 8


def _positions(count: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """First byte and bit offset in it of each of ``count`` indices of ``bits`` bits."""
    start = torch.arange(count, device=device) * bits
    return start // 8, start % 8


def pack_bits(indices: torch.Tensor, bits: int, check: bool = True) -> torch.Tensor:
    """Pack integer ``indices[..., count]`` with values in ``[0, 2**bits)`` into ``uint8[..., packed_bytes]``.

    ``check=False`` skips the range check, a read of the indices on the host: the static-shape operations
    that remain can run inside a CUDA graph (:mod:`pyramidkv.static.coded`), whose indices come from an
    ``argmin`` and are in range by construction; there a decode step packs two codes per layer, so the
    number of operations counts (:func:`_pack_groups`: 4 for 2- and 4-bit indices, 7 for 3- and 6-bit ones).
    """
    check_int("bits", bits, 1, MAX_BITS)
    check_indices(indices, bits, check)
    *lead, count = indices.shape
    flat = indices.reshape(-1, count)
    packed = _pack_groups(flat, bits) if _groups_fit(bits) else _pack_spans(flat, bits)
    return packed.reshape(*lead, packed_bytes(count, bits))


def check_indices(indices: torch.Tensor, bits: int, in_range: bool = True) -> None:
    """Raise unless ``indices`` is an integer tensor of at least one dimension, with (``in_range``: read on the
    host) every value in [0, 2**bits): what a packer of ``bits``-bit indices accepts."""
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    if indices.dim() == 0:
        raise PyramidKVError("indices must have at least one dimension (the indices of one vector)")
    if in_range and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 1 << bits):
        raise PyramidKVError(
            f"indices must lie in [0, {(1 << bits) - 1}] for bits={bits}, "
            f"got values in [{int(indices.min())}, {int(indices.max())}]"
        )


# widest group of whole bytes that _pack_groups sums in an int64 (lcm(bits, 8) bits: 1-8, 10, 12, 14, 16)
GROUP_BITS = 56


def _group(bits: int) -> int:
    """Indices per group of whole bytes: lcm(bits, 8) / bits."""
    return 8 // math.gcd(bits, 8)


def _groups_fit(bits: int) -> bool:
    """Whether a group of whole bytes fits the int64 that :func:`_pack_groups` and :func:`_unpack_groups` sum it in."""
    return _group(bits) * bits <= GROUP_BITS


def _pack_groups(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """(P, count) indices -> (P, bytes): each group of g = lcm(bits, 8) / bits indices is the integer
    sum_j i_j 2^(j bits) of g bits / 8 whole bytes, split into them; a few operations for every width whose
    group fits an int64. (The shifts are made per call: a tensor kept from a call inside a CUDA graph's
    capture would belong to that graph's memory.)"""
    group = _group(bits)
    count, nbytes, device = flat.shape[1], packed_bytes(flat.shape[1], bits), flat.device
    padded = torch.nn.functional.pad(flat, (0, -count % group)) if count % group else flat
    grouped = padded.long().reshape(flat.shape[0], padded.shape[1] // group, group)
    value = (grouped << torch.arange(0, group * bits, bits, device=device)).sum(-1)
    if group * bits == 8:  # one byte per group
        return value.to(torch.uint8)
    split = (value.unsqueeze(-1) >> torch.arange(0, group * bits, 8, device=device)) & 0xFF
    per_group = group * bits // 8
    return split.reshape(flat.shape[0], value.shape[1] * per_group)[:, :nbytes].to(torch.uint8)


def _pack_spans(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """(P, count) indices -> (P, bytes) for any width: an index shifted by its bit offset spans at most 3
    bytes (offset <= 7, bits <= 16); the spans of different indices never overlap, so adding each index's 3
    byte contributions equals OR-ing its bits in."""
    count = flat.shape[1]
    nbytes = packed_bytes(count, bits)
    first, offset = _positions(count, bits, flat.device)
    shifted = flat.int() << offset.int()
    out = torch.zeros(flat.shape[0], nbytes + 2, dtype=torch.int32, device=flat.device)
    for byte in range(3):
        out.index_add_(1, first + byte, (shifted >> (8 * byte)) & 0xFF)
    return out[:, :nbytes].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8[..., packed_bytes]`` back to ``int64[..., count]``."""
    check_int("bits", bits, 1, MAX_BITS)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got dtype {packed.dtype}")
    nbytes = packed_bytes(count, bits)
    if packed.dim() == 0 or packed.shape[-1] != nbytes:
        raise PyramidKVError(
            f"packed must end in a dimension of {nbytes} bytes for count={count}, bits={bits}, "
            f"got shape {tuple(packed.shape)}"
        )
    flat = packed.reshape(-1, nbytes)
    if _groups_fit(bits):
        indices = _unpack_groups(flat, bits, count)
    else:
        first, offset = _positions(count, bits, packed.device)
        padded = torch.nn.functional.pad(flat, (0, 2)).int()
        window = padded[:, first] | (padded[:, first + 1] << 8) | (padded[:, first + 2] << 16)
        indices = ((window >> offset) & ((1 << bits) - 1)).long()
    return indices.reshape(*packed.shape[:-1], count)


def _unpack_groups(flat: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """(P, bytes) -> (P, count) indices, :func:`_pack_groups` backwards: each group of lcm(bits, 8) / 8 bytes is
    one integer, whose g = lcm(bits, 8) / bits fields of ``bits`` bits are the indices."""
    group = _group(bits)
    per_group, device, mask = group * bits // 8, flat.device, (1 << bits) - 1
    if per_group == 1:  # whole indices per byte (1, 2, 4, 8 bits)
        value = flat.long()
    else:
        padded = torch.nn.functional.pad(flat, (0, -flat.shape[1] % per_group))
        grouped = padded.long().reshape(flat.shape[0], padded.shape[1] // per_group, per_group)
        value = (grouped << torch.arange(0, 8 * per_group, 8, device=device)).sum(-1)
    if group == 1:  # one index per group
        return value[:, :count]
    fields = (value.unsqueeze(-1) >> torch.arange(0, group * bits, bits, device=device)) & mask
    return fields.reshape(flat.shape[0], value.shape[1] * group)[:, :count]
