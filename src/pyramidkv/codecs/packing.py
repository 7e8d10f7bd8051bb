"""Bit-packing of codebook indices into uint8 tensors, lossless for every width from 1 to 16 bits.

Layout (the fused attention kernel reads it): the ``count`` indices of one vector form a little-endian bit
stream, index ``j`` in bits ``[j * bits, (j + 1) * bits)`` with its least significant bit first, and stream
bit ``t`` is bit ``t % 8`` of byte ``t // 8``. Each vector is padded to whole bytes, so a vector's codes
sit at a fixed address: ``packed_bytes(count, bits)`` bytes per vector, random access.
"""

from __future__ import annotations

import torch

MAX_BITS = 16


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that ``count`` indices of ``bits`` bits each occupy once packed (rounded up to a byte)."""
    _check_bits(bits)
    return (count * bits + 7) // 8


def _positions(count: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """First byte and bit offset in it of each of ``count`` indices of ``bits`` bits."""
    start = torch.arange(count, device=device) * bits
    return start // 8, start % 8


def pack_bits(indices: torch.Tensor, bits: int, check: bool = True) -> torch.Tensor:
    """Pack integer ``indices[..., count]`` with values in ``[0, 2**bits)`` into ``uint8[..., packed_bytes]``.

    An index shifted by its bit offset spans at most 3 bytes (offset <= 7, bits <= 16); the spans of
    different indices never overlap, so adding each index's 3 byte contributions equals OR-ing its bits in.
    ``check=False`` skips the range check, a read of the indices on the host: the static-shape operations
    that remain can run inside a CUDA graph (:mod:`pyramidkv.static_codes`), whose indices come from an
    ``argmin`` and are in range by construction.
    """
    _check_bits(bits)
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    if indices.dim() == 0:
        raise ValueError("indices must have at least one dimension (the indices of one vector)")
    if check and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 1 << bits):
        raise ValueError(
            f"indices must lie in [0, {(1 << bits) - 1}] for bits={bits}, "
            f"got values in [{int(indices.min())}, {int(indices.max())}]"
        )
    *lead, count = indices.shape
    nbytes = packed_bytes(count, bits)
    first, offset = _positions(count, bits, indices.device)
    shifted = indices.reshape(-1, count).int() << offset.int()
    out = torch.zeros(shifted.shape[0], nbytes + 2, dtype=torch.int32, device=indices.device)
    for byte in range(3):
        out.index_add_(1, first + byte, (shifted >> (8 * byte)) & 0xFF)
    return out[:, :nbytes].to(torch.uint8).reshape(*lead, nbytes)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8[..., packed_bytes]`` back to ``int64[..., count]``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got dtype {packed.dtype}")
    nbytes = packed_bytes(count, bits)
    if packed.dim() == 0 or packed.shape[-1] != nbytes:
        raise ValueError(
            f"packed must end in a dimension of {nbytes} bytes for count={count}, bits={bits}, "
            f"got shape {tuple(packed.shape)}"
        )
    first, offset = _positions(count, bits, packed.device)
    padded = torch.nn.functional.pad(packed.reshape(-1, nbytes), (0, 2)).int()
    window = padded[:, first] | (padded[:, first + 1] << 8) | (padded[:, first + 2] << 16)
    return ((window >> offset) & ((1 << bits) - 1)).long().reshape(*packed.shape[:-1], count)
