"""Attention over codes in the codecs' rotated space (the path off CUDA) against decode-then-attend."""

from __future__ import annotations

import pytest
import torch

from pyramidkv.cache.blocks import CodedBlocks
from pyramidkv.codecs import FibQuant, TurboQuant
from pyramidkv.codecs.registry import CodecPair
from pyramidkv.kernels import chunked_attention
from pyramidkv.kernels.reference import rotated_attention


@pytest.mark.parametrize(
    "codecs",
    [
        CodecPair("fibquant", FibQuant(32, bits=2), FibQuant(32, bits=2)),
        # different rotations for keys and values (seeds) and different rates
        CodecPair("mixed", FibQuant(32, bits=3, seed=1), TurboQuant(32, 2, seed=5)),
    ],
    ids=["fibquant", "two-rotations"],
)
@pytest.mark.parametrize("q_len", [1, 3])
def test_matches_attention_over_decoded_codes(codecs, q_len):
    """A ragged prompt block, a flushed block and a window with the new tokens causal among themselves, GQA
    (6 query heads on 2 KV heads), float64 inputs: the same softmax as decoding every code first."""
    torch.manual_seed(q_len)
    coded = CodedBlocks(codecs)
    lengths = torch.tensor([[0, 7], [20, 13]])
    coded.add(
        torch.randn(2, 2, 20, 32, dtype=torch.float64) * 2, torch.randn(2, 2, 20, 32), lengths
    )
    coded.add(torch.randn(2, 2, 9, 32) * 2, torch.randn(2, 2, 9, 32))
    window_k, window_v = torch.randn(2, 2, 5, 32) * 2, torch.randn(2, 2, 5, 32)
    causal = (torch.arange(5)[None, :] <= 5 - q_len + torch.arange(q_len)[:, None])[None, None]
    query = torch.randn(2, 6, q_len, 32, dtype=torch.float64)
    blocks = [(block.keys, block.values, block.visible(query.device)) for block in coded.blocks]
    got = rotated_attention(query, codecs, blocks, window_k, window_v, causal, 0.3)
    decoded = [*coded.chunks(q_len, torch.float64), (window_k.double(), window_v.double(), causal)]
    want = chunked_attention(query, decoded, 0.3)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
