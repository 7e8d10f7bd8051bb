"""static_attention.attend against a float64 masked softmax written one (row, head, token) at a time.

The buffers, the mask and the chunk are given directly (no cache): any mask, ragged per row and per KV head,
and both paths, the split matmuls (up to DECODE_ROWS packed rows) and SDPA (more). The cache's own tests
(test_static_cache.py) check the mask it builds and the decoding end to end.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from pyramidkv.static.split_attention import (
    ALIGN,
    DECODE_ROWS,
    MIN_CHUNKS,
    SPLIT_BLOCKS,
    _chunk,
    attend,
)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def _reference(query, keys, values, mask, scaling):
    """Float64 attention of each query token over the slots its mask row shows: (batch, q_len, q_heads, dim)."""
    batch, q_heads, q_len, dim = query.shape
    groups = q_heads // keys.shape[1]
    mask = mask.expand(batch, keys.shape[1], q_len, keys.shape[2])
    out = torch.empty(batch, q_len, q_heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            g = h // groups
            for t in range(q_len):
                seen = mask[b, g, t]
                weights = torch.softmax(keys[b, g][seen] @ query[b, h, t] * scaling, dim=0)
                out[b, t, h] = weights @ values[b, g][seen]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)]
)
# packed rows groups * q_len: 1, 3, 16 (matmuls); 17, 18, 24 (SDPA, the mask expanded over the group)
@pytest.mark.parametrize("groups,q_len", [(1, 1), (3, 1), (4, 4), (17, 1), (3, 6), (8, 3)])
@pytest.mark.parametrize("per_head", [True, False])
def test_attend_equals_a_masked_float64_reference(device, dtype, tol, groups, q_len, per_head):
    """Random masks, per (row, KV head) or one broadcast row per token, every token seeing a slot in the last
    chunk; six chunks, so partial sums are merged. SDPA runs under the given backends, the matmuls do not."""
    batch, kv_heads, capacity, dim, chunk = 2, 2, 96, 8, 16
    generator = torch.Generator().manual_seed(groups * 10 + q_len)

    def draw(*shape, spread=1.0):  # float64 values exactly representable in ``dtype``
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * spread).to(dtype)

    keys, values = (
        draw(batch, kv_heads, capacity, dim, spread=2.0),
        draw(batch, kv_heads, capacity, dim),
    )
    query = draw(batch, kv_heads * groups, q_len, dim)
    shape = (batch, kv_heads, q_len, capacity) if per_head else (1, 1, q_len, capacity)
    mask = torch.rand(*shape, generator=generator) < 0.3
    mask[..., -1] = True
    called = []

    def backends(where: torch.device) -> contextlib.AbstractContextManager:
        called.append(where)
        return contextlib.nullcontext()

    got = attend(
        *(t.to(device) for t in (query, keys, values, mask)),
        dim**-0.5,
        chunk,
        sdpa_backends=backends,
    )
    assert got.dtype == dtype and got.shape == (batch, q_len, kv_heads * groups, dim)
    assert got.is_contiguous()
    want = _reference(*(t.double() for t in (query, keys, values)), mask, dim**-0.5)
    torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
    assert len(called) == (groups * q_len > DECODE_ROWS)


def test_bad_shapes_are_refused():
    query, buffer, mask = (
        torch.zeros(1, 3, 1, 4),
        torch.zeros(1, 2, 32, 4),
        torch.ones(1, 1, 1, 32, dtype=bool),
    )
    with pytest.raises(
        ValueError, match="query: got 3 heads; expected a multiple of the buffers' 2"
    ):
        attend(query, buffer, buffer, mask, 0.5, 16)
    for chunk in (0, 24, 64):
        with pytest.raises(
            ValueError, match=f"chunk: got {chunk}; expected a positive divisor of the 32"
        ):
            attend(query[:, :2], buffer, buffer, mask, 0.5, chunk)


@pytest.mark.parametrize("matrices", [1, 3, 24, 384, 1000])
def test_decode_chunks(matrices):
    """Brute force: the largest power of two >= ALIGN cutting the slots into enough chunks for the batch and
    into MIN_CHUNKS; so rounding the capacity up to a chunk wastes less than max(ALIGN, length / 32)."""
    need = max(MIN_CHUNKS, -(-SPLIT_BLOCKS // matrices))
    powers = [ALIGN * 2**i for i in range(12)]
    for length in range(1, 20000, 7):
        chunk = _chunk(length, matrices)
        assert chunk == max([ALIGN] + [c for c in powers if length // c >= need])
        assert chunk <= max(ALIGN, length / MIN_CHUNKS)
