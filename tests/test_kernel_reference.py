"""The chunked log-sum-exp attention against one float64 softmax over the whole concatenated cache."""

from __future__ import annotations

import pytest
import torch

from pyramidkv.kernels.reference import chunked_attention


def dense(query, keys, values, visible, scaling):
    group = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = query.double() @ k.transpose(-1, -2) * scaling
    scores = scores.masked_fill(~visible.repeat_interleave(group, dim=1), float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "q_len", "sizes"),
    [(6, 2, 1, [5, 1, 17]), (4, 4, 3, [8, 8]), (9, 3, 2, [1])],
)
def test_matches_dense_softmax(q_heads, kv_heads, q_len, sizes):
    torch.manual_seed(0)
    batch, dim = 2, 16
    query = torch.randn(batch, q_heads, q_len, dim)
    chunks, ks, vs, ms = [], [], [], []
    for s in sizes:
        k, v = torch.randn(batch, kv_heads, s, dim) * 2, torch.randn(batch, kv_heads, s, dim)
        m = torch.rand(batch, kv_heads, q_len, s) > 0.3
        m[..., 0] = True
        chunks.append((k, v, m))
        ks, vs, ms = [*ks, k], [*vs, v], [*ms, m]
    got = chunked_attention(query, chunks, scaling=0.25)
    want = dense(query, torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(ms, -1), 0.25)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_fully_masked_first_chunk_and_empty_rows():
    torch.manual_seed(1)
    query = torch.randn(1, 2, 1, 8)
    k1, v1 = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    k2, v2 = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    hidden = torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    got = chunked_attention(query, [(k1, v1, hidden), (k2, v2, None)], scaling=1.0)
    want = dense(query, k2, v2, torch.ones(1, 1, 1, 3, dtype=torch.bool), 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    nothing = chunked_attention(query, [(k1, v1, hidden)], scaling=1.0)
    assert torch.equal(nothing, torch.zeros_like(query))
