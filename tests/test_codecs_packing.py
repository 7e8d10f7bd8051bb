"""Bit-packing: lossless for every width 1..16, and the documented little-endian layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyramidkv.codecs import pack_bits, packed_bytes, unpack_bits


def reference_pack(values: list[int], bits: int) -> list[int]:
    """Slow, obvious packer: a string of bits, LSB of each index first, LSB of each byte first."""
    stream = "".join(format(v, f"0{bits}b")[::-1] for v in values)
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8)]


@pytest.mark.parametrize("bits", range(1, 17))
def test_round_trip_every_width(bits):
    generator = torch.Generator().manual_seed(bits)
    count = 37  # not a multiple of 8: exercises the padding of the last byte
    indices = torch.randint(0, 1 << bits, (3, 4, count), generator=generator)
    indices[0, 0, :2] = torch.tensor([0, (1 << bits) - 1])  # both extremes
    packed = pack_bits(indices, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 4, (count * bits + 7) // 8)
    assert torch.equal(unpack_bits(packed, bits, count), indices)


@pytest.mark.parametrize(
    "bits", range(1, 17)
)  # groups of whole bytes (1-8, 10, 12, 14, 16), spans (the rest)
def test_layout_matches_reference(bits):
    generator = torch.Generator().manual_seed(100 + bits)
    values = torch.randint(0, 1 << bits, (13,), generator=generator)
    assert pack_bits(values, bits).tolist() == reference_pack(values.tolist(), bits)


@settings(max_examples=25, deadline=None)
@given(
    bits=st.integers(1, 16),
    lead=st.lists(st.integers(0, 3), max_size=2),
    count=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_random_shapes(bits, lead, count, seed):
    indices = torch.randint(
        0, 1 << bits, (*lead, count), generator=torch.Generator().manual_seed(seed)
    )
    packed = pack_bits(indices, bits)
    assert packed.shape == (*lead, packed_bytes(count, bits))
    assert torch.equal(unpack_bits(packed, bits, count), indices)


def test_bad_input():
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.long), 17)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 7\]"):
        pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="indices"):
        pack_bits(torch.tensor([-1]), 3)
    with pytest.raises(TypeError, match="indices"):
        pack_bits(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="packed"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, count=16)
    with pytest.raises(TypeError, match="packed"):
        unpack_bits(torch.zeros(6, dtype=torch.int32), 3, count=16)


def test_unchecked_packing_skips_only_the_range_check():
    """check=False (for CUDA graphs: no host read) packs valid indices as the checked call does, and lets
    an out-of-range index through instead of reading the tensor to refuse it."""
    indices = torch.randint(0, 64, (5, 11), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_bits(indices, 6, check=False), pack_bits(indices, 6))
    indices[0, 0] = 64
    with pytest.raises(ValueError, match="indices must lie in"):
        pack_bits(indices, 6)
    assert pack_bits(indices, 6, check=False).shape == (5, packed_bytes(11, 6))


VIEWS = {"view", "_unsafe_view", "unsqueeze", "alias", "slice", "reshape", "expand", "squeeze"}


@pytest.mark.parametrize(("bits", "most"), [(2, 4), (4, 4), (3, 7), (6, 7)])
def test_packing_in_a_graph_step_takes_a_few_operations(bits, most):
    """A decode step over static codes packs two codes per layer inside the captured graph, so TurboQuant's 2,
    3 and 4-bit indices and FibQuant's 6-bit ones must not cost the ~20 operations of per-index byte spans."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += func.overloadpacket.__name__ not in VIEWS  # launches a kernel on a GPU
            return func(*args, **(kwargs or {}))

    indices = torch.randint(0, 1 << bits, (6, 64))
    with Count():
        packed = pack_bits(indices, bits, check=False)
    assert Count.ops <= most
    assert torch.equal(unpack_bits(packed, bits, 64), indices)
