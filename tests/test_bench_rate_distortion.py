"""The pure metrics of ``benchmarks/rate_distortion_model.py`` (``rate_distortion.py --part model``) against slow float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from .conftest import load_benchmark

bench = load_benchmark("rate_distortion_model")


def _brute_attention(queries, keys, values, scaling):
    """One (head, query) at a time with Python floats: query head h reads KV head h // group."""
    q_heads, count, d = queries.shape
    kv_heads, n, _ = keys.shape
    group = q_heads // kv_heads
    out = torch.zeros(q_heads, count, d, dtype=torch.float64)
    for h in range(q_heads):
        kv = h // group
        for i in range(count):
            position = n - count + i
            logits = [
                scaling * sum(float(queries[h, i, c]) * float(keys[kv, j, c]) for c in range(d))
                for j in range(position + 1)
            ]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            total = sum(weights)
            for j, w in enumerate(weights):
                out[h, i] += (w / total) * values[kv, j].double()
    return out


@pytest.mark.parametrize(("q_heads", "kv_heads", "n", "count"), [(6, 2, 9, 4), (3, 3, 5, 5)])
def test_attention_outputs_match_brute_force(q_heads, kv_heads, n, count):
    generator = torch.Generator().manual_seed(q_heads * 100 + n)
    d = 5
    queries = torch.randn(q_heads, count, d, generator=generator) * 2
    keys = torch.randn(kv_heads, n, d, generator=generator)
    values = torch.randn(kv_heads, n, d, generator=generator)
    got = bench.attention_outputs(queries, keys, values, scaling=d**-0.5)
    torch.testing.assert_close(got, _brute_attention(queries, keys, values, d**-0.5))


def test_attention_cosine_and_mse_match_definitions():
    generator = torch.Generator().manual_seed(7)
    a, b = torch.randn(3, 4, 6, generator=generator), torch.randn(3, 4, 6, generator=generator)
    cosine = bench.attention_cosine(a, b)
    for h in range(3):
        for i in range(4):
            x, y = a[h, i].tolist(), b[h, i].tolist()
            dot = sum(p * q for p, q in zip(x, y, strict=True))
            expected = dot / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))
            assert cosine[h, i].item() == pytest.approx(expected, rel=1e-9)
    squared = [
        (p - q) ** 2 for p, q in zip(a.flatten().tolist(), b.flatten().tolist(), strict=True)
    ]
    assert bench.mse_per_coordinate(a, b) == pytest.approx(sum(squared) / len(squared), rel=1e-9)
    assert torch.allclose(bench.attention_cosine(a, a), torch.ones(3, 4, dtype=torch.float64))


def test_frontier_picks_the_highest_ratio_that_reaches_the_threshold():
    rows = [
        {"compression_ratio": r, "attention_cosine_mean": c}
        for r, c in [(1.0, 1.0), (4.0, 0.995), (8.0, 0.97), (16.0, 0.6), (6.0, 0.989)]
    ]
    assert bench.frontier(rows, 0.99)["compression_ratio"] == max(
        r["compression_ratio"] for r in rows if r["attention_cosine_mean"] >= 0.99
    )
    assert bench.frontier(rows, 0.95)["compression_ratio"] == 8.0
    assert bench.frontier(rows, 0.9999999) == rows[0]
    assert bench.frontier(rows[3:4], 0.95) is None


def test_attention_outputs_reject_mismatched_heads():
    with pytest.raises(ValueError, match="q_heads"):
        bench.attention_outputs(
            torch.zeros(4, 2, 3), torch.zeros(3, 5, 3), torch.zeros(3, 5, 3), 1.0
        )
