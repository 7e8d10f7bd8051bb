"""select(): the rules every policy relies on, checked directly and on random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyramidkv.policies import (
    AccumulatedAttentionScorer,
    KeyNormScorer,
    RandomScorer,
    SinksRecentScorer,
    WindowAttentionScorer,
    select,
)


def left_padded(counts: list[int], n: int) -> torch.Tensor:
    valid = torch.zeros(len(counts), n, dtype=torch.bool)
    for row, count in enumerate(counts):
        valid[row, n - count :] = True
    return valid


def check_rules(scores, valid, budgets, window, indices, lengths):
    """Every promise of select(), from its definition."""
    batch, heads, n = scores.shape
    counts = valid.sum(dim=1)
    assert indices.dtype == torch.long and lengths.dtype == torch.long
    assert lengths.shape == (batch, heads)
    assert indices.shape == (batch, heads, int(lengths.max()) if batch else 0)
    assert bool(((indices >= 0) & (indices < max(n, 1))).all())
    for b in range(batch):
        keep = min(int(budgets[b]), int(counts[b]))
        positions = valid[b].nonzero().flatten().tolist()
        for h in range(heads):
            length = int(lengths[b, h])
            kept = indices[b, h, :length].tolist()
            assert length == keep <= int(budgets[b])
            assert kept == sorted(set(kept))  # ascending, no repeats
            assert all(valid[b, j] for j in kept)  # padding never kept
            assert set(positions[len(positions) - min(window, keep) :]) <= set(kept)  # window kept
            if length:  # fill repeats the last kept index
                assert (indices[b, h, length:] == kept[-1]).all()
            else:
                assert (indices[b, h] == 0).all()


def test_rules_on_a_small_batch():
    torch.manual_seed(0)
    valid = left_padded([20, 13, 4, 0], 20)
    scores = torch.randn(4, 2, 20)
    budgets = torch.tensor([7, 13, 9, 5])
    indices, lengths = select(scores, valid, budgets, 3)
    check_rules(scores, valid, budgets, 3, indices, lengths)
    assert lengths.tolist() == [[7, 7], [13, 13], [4, 4], [0, 0]]
    assert indices[1, 0, :13].tolist() == list(range(7, 20))  # budget == valid length: keep all
    assert indices[2, 1, :4].tolist() == [16, 17, 18, 19]  # budget > valid length: keep all


def test_ties_go_to_the_more_recent_token():
    valid = torch.ones(1, 10, dtype=torch.bool)
    scores = torch.tensor([[[5.0, 1, 1, 1, 1, 1, 1, 1, 0, 0]]])
    indices, _ = select(scores, valid, torch.tensor([5]), 2)
    assert indices[0, 0].tolist() == [0, 6, 7, 8, 9]


def test_nan_scores_rank_last_and_window_beats_any_score():
    valid = torch.ones(1, 6, dtype=torch.bool)
    scores = torch.tensor([[[float("nan"), 2.0, float("inf"), -1.0, float("-inf"), -9.0]]])
    indices, _ = select(scores, valid, torch.tensor([4]), 2)
    assert indices[0, 0].tolist() == [1, 2, 4, 5]


def test_budget_smaller_than_window_keeps_the_most_recent():
    valid = left_padded([10], 12)
    scores = torch.arange(12.0).flip(0).reshape(1, 1, 12)  # prefers old tokens
    indices, lengths = select(scores, valid, torch.tensor([3]), 8)
    assert indices[0, 0].tolist() == [9, 10, 11] and lengths.tolist() == [[3]]


def test_zero_budget_keeps_nothing():
    indices, lengths = select(torch.randn(2, 1, 5), left_padded([5, 3], 5), torch.tensor([0, 0]), 2)
    assert indices.shape == (2, 1, 0) and lengths.tolist() == [[0], [0]]


@pytest.mark.parametrize(
    ("scores", "valid", "budgets", "window", "name"),
    [
        (torch.randn(2, 5), left_padded([5, 5], 5), torch.tensor([2, 2]), 1, "scores"),
        (torch.randn(2, 1, 5), left_padded([5], 5), torch.tensor([2, 2]), 1, "valid"),
        (torch.randn(2, 1, 5), left_padded([5, 5], 5).int(), torch.tensor([2, 2]), 1, "valid"),
        (torch.randn(2, 1, 5), left_padded([5, 5], 5), torch.tensor([2.0, 2.0]), 1, "budgets"),
        (torch.randn(2, 1, 5), left_padded([5, 5], 5), torch.tensor([2]), 1, "budgets"),
        (torch.randn(2, 1, 5), left_padded([5, 5], 5), torch.tensor([2, -1]), 1, "budgets"),
        (torch.randn(2, 1, 5), left_padded([5, 5], 5), torch.tensor([2, 2]), -1, "window"),
    ],
)
def test_select_rejects_bad_input(scores, valid, budgets, window, name):
    with pytest.raises(ValueError, match=name):
        select(scores, valid, budgets, window)


SCORERS = [
    WindowAttentionScorer(),
    WindowAttentionScorer(kernel_size=3, pooling="avg"),
    AccumulatedAttentionScorer(block_size=3),
    SinksRecentScorer(),
    KeyNormScorer(),
    RandomScorer(seed=1),
]


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    n=st.integers(1, 40),
    dim=st.integers(1, 8),
    window=st.integers(1, 10),
    scorer=st.sampled_from(SCORERS),
)
def test_random_shapes_never_break_the_rules(data, batch, kv_heads, groups, n, dim, window, scorer):
    counts = data.draw(st.lists(st.integers(0, n), min_size=batch, max_size=batch))
    budgets = torch.tensor(
        data.draw(st.lists(st.integers(1, n + 5), min_size=batch, max_size=batch))
    )
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, kv_heads * groups, n, dim, generator=gen)
    keys = torch.randn(batch, kv_heads, n, dim, generator=gen)
    valid = left_padded(counts, n)
    q_len = n if scorer.needs_all_queries else min(window, n)
    scores = scorer.score(queries[..., n - q_len :, :], keys, valid, dim**-0.5)
    assert scores.shape == (batch, kv_heads, n) and scores.dtype == torch.float32
    assert not scores.isnan().any()
    indices, lengths = select(scores, valid, budgets, window)
    check_rules(scores, valid, budgets, window, indices, lengths)
