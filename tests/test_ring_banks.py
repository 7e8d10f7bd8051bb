"""The ring slots' swizzle of the CUDA decode kernel (``cuda_decode.RING_SWIZZLE``) against a model of shared memory.

The model: 32 banks of 4 bytes; a warp's load of ``width`` bytes per lane is served in phases of 128 bytes (32, 16
or 8 lanes), and a phase takes as many wavefronts as the most distinct 4-byte words any one bank holds among its
addresses (lanes reading one word share it). The reads are the kernel's (``read_slot``): lane (g, t) reads the
index bytes of key g (and g + 8) at byte t KEY_BYTES, and of value tokens 2t, 2t + 1, 2t + 8, 2t + 9 at byte
g VAL_BYTES, with the widest loads the bytes' alignment allows (``lds_bytes``). The slot places bytes as the
kernel's ``slot_byte`` does, from the constants ``MmaVariant.source`` defines.
"""

from __future__ import annotations

import re

import pytest

from pyramidkv.kernels import cuda_decode

SWIZZLED = sorted(cuda_decode.RING_SWIZZLE)


def layout(dim: int, k: int, n: int) -> tuple[int, int, int, int]:
    """Index bytes per token, per lane's key read and value read, and the copy chunk (the kernel's NBYTES,
    KEY_BYTES, VAL_BYTES and CHUNK)."""
    bits = n.bit_length() - 1
    nbytes = dim // k * bits // 8
    return nbytes, dim // (4 * k) * bits // 8, dim // (8 * k) * bits // 8, 8 if nbytes % 16 else 16


def loads(nbytes: int) -> list[tuple[int, int]]:
    """(offset, width) of the loads ``lds_bytes`` issues for ``nbytes`` bytes aligned to their lowest set bit."""
    align = nbytes & -nbytes
    if nbytes in (8, 16) and align >= nbytes:
        return [(0, nbytes)]
    if nbytes % 4 == 0:
        return [(4 * i, 4) for i in range(nbytes // 4)]
    if nbytes % 2 == 0:
        return [(2 * i, 2) for i in range(nbytes // 2)]
    return [(i, 1) for i in range(nbytes)]


def wavefronts(addresses: list[int], width: int) -> int:
    """Wavefronts of one warp load of ``width`` bytes per lane (sub-word loads read their word)."""
    span = max(width, 4)
    lanes = 128 // span
    total = 0
    for first in range(0, 32, lanes):
        banks: dict[int, set[int]] = {}
        for address in addresses[first : first + lanes]:
            for word in range(address // 4, (address + span - 1) // 4 + 1):
                banks.setdefault(word % 32, set()).add(word)
        total += max(len(words) for words in banks.values())
    return total


def slot_byte(perm: tuple[int, ...], xor: tuple[int, ...], nbytes: int, chunk: int):
    """The kernel's ``slot_byte``: where index byte b of tile token tok sits in its array of a slot."""
    chunks = nbytes // chunk

    def place(tok: int, b: int) -> int:
        row = perm[tok & 7] | (tok & 8)
        part = (b // chunk) ^ xor[tok & 7]
        assert part < chunks, "a chunk XOR must stay in its row"
        return row * nbytes + part * chunk + b % chunk

    return place


def read_wavefronts(dim: int, k: int, n: int, perm: tuple[int, ...], xor: tuple[int, ...]) -> int:
    """Wavefronts of one warp's index reads of a tile (both n-tiles of keys, the four value tokens)."""
    nbytes, key_bytes, val_bytes, chunk = layout(dim, k, n)
    place = slot_byte(perm, xor, nbytes, chunk)
    total = 0
    for nt in range(2):
        for off, width in loads(key_bytes):
            addresses = [
                place(8 * nt + lane // 4, lane % 4 * key_bytes + off) for lane in range(32)
            ]
            total += wavefronts(addresses, width)
    for j in range(4):
        for off, width in loads(val_bytes):
            token = [2 * (lane % 4) + (j & 1) + 8 * (j >> 1) for lane in range(32)]
            addresses = [place(token[lane], lane // 4 * val_bytes + off) for lane in range(32)]
            total += wavefronts(addresses, width)
    return total


def least_wavefronts(dim: int, k: int, n: int) -> int:
    """The fewest the reads can take: each load moves its warp's bytes in whole wavefronts of 128 bytes."""
    _, key_bytes, val_bytes, _ = layout(dim, k, n)
    per_load = lambda nb: sum(-(-32 * max(width, 4) // 128) for _, width in loads(nb))  # noqa: E731
    return 2 * per_load(key_bytes) + 4 * per_load(val_bytes)


def defined(source: str, name: str) -> int:
    return int(re.search(rf"#define {name} (0x[0-9a-f]+)u", source).group(1), 16)


@pytest.mark.parametrize(
    "key", SWIZZLED, ids=[f"d{d}-k{k}-n{n}-rows{r}" for d, k, n, r in SWIZZLED]
)
def test_the_swizzle_takes_the_fewest_wavefronts_the_reads_allow(key):
    dim, k, n, _ = key
    perm, xor = cuda_decode.RING_SWIZZLE[key]
    nbytes, key_bytes, val_bytes, chunk = layout(dim, k, n)
    assert sorted(perm) == list(range(8))
    if any(xor):  # a lane's bytes must not straddle the chunks the XOR moves apart
        assert chunk % key_bytes == 0 and chunk % val_bytes == 0
    if (
        16 * nbytes > 32 * chunk
    ):  # a lane copies two chunks of an array; the Feed puts the second 32 chunks on
        assert (32 * chunk) % (8 * nbytes) == 0
    identity = read_wavefronts(dim, k, n, *cuda_decode.NO_SWIZZLE)
    assert read_wavefronts(dim, k, n, perm, xor) == least_wavefronts(dim, k, n) < identity


def test_the_counts_the_notes_give():
    """12 -> 8 wavefronts per tile at 2 bits and 40 -> 16 at 4 bits (d = 128); 30 at 3 bits, unswizzled."""
    assert read_wavefronts(128, 4, 256, *cuda_decode.NO_SWIZZLE) == 12
    assert read_wavefronts(128, 4, 256, *cuda_decode.RING_SWIZZLE[(128, 4, 256, 4)]) == 8
    assert read_wavefronts(128, 2, 256, *cuda_decode.NO_SWIZZLE) == 40
    assert read_wavefronts(128, 2, 256, *cuda_decode.RING_SWIZZLE[(128, 2, 256, 4)]) == 16
    assert read_wavefronts(128, 2, 64, *cuda_decode.NO_SWIZZLE) == 30


@pytest.mark.parametrize("rows", cuda_decode.ROW_CAPS)
@pytest.mark.parametrize(
    ("dim", "k", "n"), [(128, 4, 256), (128, 2, 256), (128, 2, 64), (64, 4, 256)]
)
def test_the_source_defines_the_variants_swizzle(dim, k, n, rows):
    """``ROW_PERM`` and ``CHUNK_XOR`` pack the table's entry (3 and 2 bits per token), identity elsewhere;
    ``SWIZZLED`` says which (the kernel's plain offsets where it is 0)."""
    variant = cuda_decode.MmaVariant(dim, k, rows, n=n)
    source = variant.source()
    perm, xor = cuda_decode.RING_SWIZZLE.get((dim, k, n, rows), cuda_decode.NO_SWIZZLE)
    assert variant.swizzle == (perm, xor)
    row_perm, chunk_xor = defined(source, "ROW_PERM"), defined(source, "CHUNK_XOR")
    assert tuple((row_perm >> 3 * tok) & 7 for tok in range(8)) == perm
    assert tuple((chunk_xor >> 2 * tok) & 3 for tok in range(8)) == xor
    swizzled = int(re.search(r"#define SWIZZLED (\d)\n", source).group(1))
    assert swizzled == ((perm, xor) != cuda_decode.NO_SWIZZLE)
