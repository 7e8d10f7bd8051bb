"""Scorers + select() against slow, obvious float64 references written here from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from pyramidkv.policies import (
    AccumulatedAttentionScorer,
    KeyNormScorer,
    RandomScorer,
    SinksRecentScorer,
    WindowAttentionScorer,
    select,
)

CONFIGS = {"gqa": (6, 2), "mha": (3, 3)}  # (query heads, KV heads)
N, D, WINDOW = 37, 16, 8
PADDING = (0, 5, 30)  # left padding per row; row 2 has 7 valid tokens, fewer than the window
BUDGETS = (12, 9, 20)


def make_inputs(config: str, seed: int = 0):
    q_heads, kv_heads = CONFIGS[config]
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(len(PADDING), q_heads, N, D, generator=gen) * 2
    keys = torch.randn(len(PADDING), kv_heads, N, D, generator=gen) * 2
    valid = torch.ones(len(PADDING), N, dtype=torch.bool)
    for row, pad in enumerate(PADDING):
        valid[row, :pad] = False
    return queries, keys, valid, D**-0.5


# ------------------------------------------------------------------------------------ references


def softmax(x: list[float]) -> list[float]:
    top = max(x)
    e = [math.exp(v - top) for v in x]
    return [v / sum(e) for v in e]


def attention_sums(queries, keys, valid, scaling, first):
    """sum over the given queries (at positions first..) of causal, padding-masked softmax; float64."""
    batch, q_heads, q_len, _ = queries.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    q, k = queries.double(), keys.double()
    out = torch.zeros(batch, q_heads, n, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            for i in range(q_len):
                pos = first + i
                if not valid[b, pos]:
                    continue
                seen = [j for j in range(pos + 1) if valid[b, j]]
                logits = [float(k[b, h // group, j] @ q[b, h, i]) * scaling for j in seen]
                for j, p in zip(seen, softmax(logits), strict=True):
                    out[b, h, j] += p
    return out


def pool(values: list[float], kernel: int, pooling: str) -> list[float]:
    """1-D pooling, stride 1, same length; avg divides by the kernel (zero padding), max ignores edges."""
    if pooling == "none":
        return values
    r = kernel // 2
    out = []
    for j in range(len(values)):
        near = values[max(0, j - r) : j + r + 1]
        out.append(max(near) if pooling == "max" else sum(near) / kernel)
    return out


def ref_window_scores(queries, keys, valid, scaling, kernel, pooling):
    """SnapKV/PyramidKV: window attention summed, pooled over the prefix only, mean in the GQA group."""
    q_heads, q_len = queries.shape[1], queries.shape[2]
    batch, kv_heads, n = keys.shape[0], keys.shape[1], keys.shape[2]
    first = n - q_len
    sums = attention_sums(queries, keys, valid, scaling, first)
    scores = torch.full((batch, kv_heads, n), float("inf"), dtype=torch.float64)
    scores[..., :first] = 0
    for b in range(batch):
        for h in range(q_heads):
            pooled = pool(sums[b, h, :first].tolist(), kernel, pooling)
            scores[b, h // (q_heads // kv_heads), :first] += torch.tensor(pooled) / (
                q_heads // kv_heads
            )
    return scores


def ref_h2o_scores(queries, keys, valid, scaling):
    q_heads, kv_heads = queries.shape[1], keys.shape[1]
    sums = attention_sums(queries, keys, valid, scaling, 0)
    return sums.reshape(sums.shape[0], kv_heads, q_heads // kv_heads, -1).mean(dim=2)


def ref_select(scores, valid, budgets, window):
    """Per (row, head): last min(window, keep) valid tokens, then best scores, ties to the recent one."""
    out = {}
    for b in range(scores.shape[0]):
        positions = [j for j in range(scores.shape[2]) if valid[b, j]]
        keep = min(int(budgets[b]), len(positions))
        recent = positions[len(positions) - min(window, keep) :]
        for h in range(scores.shape[1]):
            rest = [j for j in positions if j not in recent]
            rest.sort(key=lambda j: (float(scores[b, h, j]), j), reverse=True)
            out[b, h] = sorted(recent + rest[: keep - len(recent)])
    return out


def assert_selects(scores, valid, budgets, window, expected):
    indices, lengths = select(scores, valid, torch.tensor(budgets), window)
    for (b, h), want in expected.items():
        assert lengths[b, h] == len(want)
        assert indices[b, h, : len(want)].tolist() == want, (b, h)


# ---------------------------------------------------------------------------------------- scorers


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(("kernel", "pooling"), [(7, "max"), (5, "avg"), (3, "max"), (1, "none")])
def test_window_attention_matches_reference(config, kernel, pooling):
    queries, keys, valid, scaling = make_inputs(config, seed=kernel)
    window_queries = queries[..., -WINDOW:, :]
    got = WindowAttentionScorer(kernel, pooling).score(window_queries, keys, valid, scaling)
    want = ref_window_scores(window_queries, keys, valid, scaling, kernel, pooling)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert_selects(got, valid, BUDGETS, WINDOW, ref_select(want, valid, BUDGETS, WINDOW))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("block_size", [1, 5, 37, 256])
def test_accumulated_attention_blocks_match_unblocked_reference(config, block_size):
    queries, keys, valid, scaling = make_inputs(config, seed=3)
    got = AccumulatedAttentionScorer(block_size).score(queries, keys, valid, scaling)
    want = ref_h2o_scores(queries, keys, valid, scaling)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert_selects(got, valid, BUDGETS, WINDOW, ref_select(want, valid, BUDGETS, WINDOW))


def test_accumulated_attention_ignores_invalid_queries_anywhere():
    """Not only left padding: an invalid position in the middle neither scores nor is scored."""
    queries, keys, valid, scaling = make_inputs("gqa", seed=6)
    valid[0, 10:14] = False
    valid[1, -3:] = False
    got = AccumulatedAttentionScorer(block_size=8).score(queries, keys, valid, scaling)
    want = ref_h2o_scores(queries, keys, valid, scaling)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS)
def test_key_norm_keeps_the_smallest_keys(config):
    queries, keys, valid, scaling = make_inputs(config, seed=4)
    got = KeyNormScorer().score(queries[..., -WINDOW:, :], keys, valid, scaling)
    want = -keys.double().pow(2).sum(-1).sqrt()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert_selects(got, valid, BUDGETS, WINDOW, ref_select(want, valid, BUDGETS, WINDOW))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("sinks", [0, 1, 4])
def test_sinks_recent_keeps_first_tokens_then_recent(config, sinks):
    queries, keys, valid, scaling = make_inputs(config)
    got = SinksRecentScorer(sinks).score(queries[..., -WINDOW:, :], keys, valid, scaling)
    indices, lengths = select(got, valid, torch.tensor(BUDGETS), WINDOW)
    for b, pad in enumerate(PADDING):
        positions = list(range(pad, N))
        keep = min(BUDGETS[b], len(positions))
        first = positions[: min(sinks, keep - min(WINDOW, keep))]
        want = sorted(set(first) | set(positions[len(positions) - (keep - len(first)) :]))
        for h in range(keys.shape[1]):
            assert indices[b, h, : lengths[b, h]].tolist() == want


def test_random_scorer_is_seeded_and_deterministic():
    queries, keys, valid, scaling = make_inputs("gqa")
    window_queries = queries[..., -WINDOW:, :]
    a = RandomScorer(seed=7).score(window_queries, keys, valid, scaling)
    b = RandomScorer(seed=7).score(window_queries, keys, valid, scaling)
    c = RandomScorer(seed=8).score(window_queries, keys, valid, scaling)
    want = torch.rand(keys.shape[1:3], generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, want.expand(keys.shape[:3]))
    # layers batched into rows (CompressedCache's compress_after="forward") draw what each draws alone
    twice = [torch.cat([t, t]) for t in (window_queries, keys, valid)]
    assert torch.equal(RandomScorer(seed=7).score(*twice, scaling), torch.cat([a, a]))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert_selects(a, valid, BUDGETS, WINDOW, ref_select(a.double(), valid, BUDGETS, WINDOW))


@pytest.mark.parametrize(
    "scorer",
    [
        WindowAttentionScorer(),
        AccumulatedAttentionScorer(block_size=4),
        SinksRecentScorer(),
        KeyNormScorer(),
    ],
    ids=lambda s: type(s).__name__,
)
def test_left_padding_does_not_change_the_selection(scorer):
    """A row padded on the left keeps the same tokens (shifted) as the same row alone."""
    queries, keys, _, scaling = make_inputs("gqa", seed=5)
    pad = 6
    alone_q, alone_k = queries[:1, :, pad:], keys[:1, :, pad:]
    alone_valid = torch.ones(1, N - pad, dtype=torch.bool)
    padded_valid = torch.ones(1, N, dtype=torch.bool)
    padded_valid[0, :pad] = False
    padded_q = queries[:1].clone()
    padded_k = keys[:1].clone()
    padded_q[:, :, :pad] = 1e3  # garbage at padding must not matter
    padded_k[:, :, :pad] = -1e3
    q_len = N if scorer.needs_all_queries else WINDOW
    budget = torch.tensor([13])
    s_alone = scorer.score(
        alone_q[..., -q_len:, :] if q_len < N else alone_q, alone_k, alone_valid, scaling
    )
    s_padded = scorer.score(padded_q[..., -q_len:, :], padded_k, padded_valid, scaling)
    i_alone, _ = select(s_alone, alone_valid, budget, WINDOW)
    i_padded, _ = select(s_padded, padded_valid, budget, WINDOW)
    assert torch.equal(i_alone + pad, i_padded)


def test_scorers_reject_mismatched_shapes():
    queries, keys, valid, scaling = make_inputs("gqa")
    with pytest.raises(ValueError, match="heads"):
        WindowAttentionScorer().score(queries[:, :5, -WINDOW:], keys, valid, scaling)
    with pytest.raises(ValueError, match="valid"):
        KeyNormScorer().score(queries, keys, valid[:, :-1], scaling)
    with pytest.raises(ValueError, match="queries"):
        AccumulatedAttentionScorer().score(queries, keys[:, :, :10], valid[:, :10], scaling)
