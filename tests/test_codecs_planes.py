"""3-bit codes in planes (codecs/planes.py): the layout against a bit-by-bit reference of its rules, the CUDA
kernel's register arithmetic replayed on the bytes, and the codec that stores its codes so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyramidkv.codecs import TurboQuant
from pyramidkv.codecs.planes import pack_planes, plane_bytes, unpack_planes
from pyramidkv.codecs.registry import make_codecs

DIMS = (64, 128, 256)


def reference_bytes(codes: list[int], d: int) -> bytes:
    """The planes of one vector, bit by bit from the rules: chunk t of d / 4 coordinates at byte t 3d / 32;
    coordinate c = 16 w + 4 i + j of a chunk: low bits at bit 2 j of byte 4 w + i, high bit at bit R i + 4 w + j
    of the d / 32 bytes after the d / 16 low bytes (R = d / 16)."""
    out = bytearray(3 * d // 8)
    chunk, registers = d // 4, d // 16
    for coordinate, code in enumerate(codes):
        t, c = divmod(coordinate, chunk)
        w, i, j = c // 16, (c // 4) % 4, c % 4
        base = t * 3 * d // 32
        out[base + 4 * w + i] |= (code & 3) << (2 * j)
        bit = registers * i + 4 * w + j
        out[base + d // 16 + bit // 8] |= (code >> 2) << (bit % 8)
    return bytes(out)


@pytest.mark.parametrize("d", DIMS)
def test_planes_follow_their_rules_and_unpack(d):
    torch.manual_seed(d)
    codes = torch.randint(0, 8, (5, 3, d))
    packed = pack_planes(codes, d)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, plane_bytes(d)) == (
        5,
        3,
        3 * d // 8,
    )
    for row, want in zip(packed.reshape(-1, 3 * d // 8), codes.reshape(-1, d), strict=True):
        assert bytes(row.tolist()) == reference_bytes(want.tolist(), d)
    assert torch.equal(unpack_planes(packed, d), codes)


def kernel_registers(lane_bytes: bytes, d: int) -> list[int]:
    """What ``keys_affine`` in cuda/mma_decode.cu computes for 3-bit keys from one lane's 3d / 32 bytes: its 32-bit
    words (little-endian), the high word spread a nibble per byte at d = 64, then per register m the low bits
    (word m / 4 >> 2 (m % 4)) & 0x03030303 ORed with the high bits shifted to bit 2 of each byte."""
    words = np.frombuffer(lane_bytes + bytes(-len(lane_bytes) % 4), dtype="<u4").astype(np.uint64)
    high = int(words[d // 64])
    if d == 64:
        high = (high | (high << 8)) & 0x00FF00FF
        high = (high | (high << 4)) & 0x0F0F0F0F
    registers = []
    for m in range(d // 16):
        low = (int(words[m >> 2]) >> (2 * (m & 3))) & 0x03030303
        shifted = high >> (m - 2) if m >= 2 else (high << (2 - m)) & 0xFFFFFFFF
        registers.append(low | (shifted & 0x04040404))
    return registers


@pytest.mark.parametrize("d", [64, 128])
def test_the_kernels_registers_hold_the_codes_of_their_coordinates(d):
    """Byte i of lane t's register m must be the code of coordinate t d / 4 + 16 (m / 4) + 4 i + m % 4: the order
    the kernel lays the int8 query out in. A wrong shift, mask or spread in the kernel's arithmetic (replayed
    here) or in the layout fails this."""
    torch.manual_seed(1)
    codes = torch.randint(0, 8, (d,))
    packed = bytes(pack_planes(codes, d).tolist())
    share = 3 * d // 32
    for t in range(4):
        for m, register in enumerate(kernel_registers(packed[t * share : (t + 1) * share], d)):
            for i in range(4):
                coordinate = t * d // 4 + 16 * (m // 4) + 4 * i + m % 4
                assert (register >> (8 * i)) & 0xFF == int(codes[coordinate])


def test_a_codec_in_planes_decodes_as_in_the_stream():
    """Only the byte order differs: the same indices and the same decoded vectors as the stream layout, bytes that
    differ, a different book_key (codes do not read alike), and no grouped reading."""
    x = torch.randn(4, 9, 128, dtype=torch.float64)
    stream = TurboQuant(128, 3, grid="uniform")
    planes = TurboQuant(128, 3, grid="uniform", layout="planes")
    a, b = stream.encode(x), planes.encode(x)
    assert a.indices.shape == b.indices.shape and not torch.equal(a.indices, b.indices)
    assert torch.equal(stream.unpack(a), planes.unpack(b))
    assert torch.equal(stream.decode(a), planes.decode(b))
    assert torch.equal(stream.decode_rotated(a), planes.decode_rotated(b))
    assert stream.book_key != planes.book_key
    assert planes.bits_per_coordinate() == stream.bits_per_coordinate()
    with pytest.raises(ValueError, match="group: codes in planes"):
        planes.grouped_codebook(2, "cpu")


def test_planes_refuse_what_they_cannot_hold():
    with pytest.raises(ValueError, match="layout: planes hold 3-bit codes"):
        TurboQuant(128, 2, layout="planes")
    with pytest.raises(ValueError, match="layout: planes need a head dim that is a multiple of 64"):
        TurboQuant(96, 3, layout="planes")
    with pytest.raises(ValueError, match="layout must be one of"):
        TurboQuant(128, 3, layout="bytes")
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 7\]"):
        pack_planes(torch.full((64,), 8), 64)
    with pytest.raises(ValueError, match="must end in a dimension of 24 bytes"):
        unpack_planes(torch.zeros(23, dtype=torch.uint8), 64)


@pytest.mark.parametrize(
    ("spec", "dim", "keys", "values"),
    [
        ("uniform/fibquant:3", 128, "planes", "stream"),
        ("uniform:3", 64, "planes", "stream"),
        ("uniform:3", 96, "stream", "stream"),  # no planes at this head dim
        ("uniform:2", 128, "stream", "stream"),
        ("turboquant:3", 128, "stream", "stream"),
    ],
)
def test_uniform_keys_of_3_bits_are_stored_in_planes(spec, dim, keys, values):
    pair = make_codecs(spec, dim)
    assert (pair.keys.layout, pair.values.layout) == (keys, values)
