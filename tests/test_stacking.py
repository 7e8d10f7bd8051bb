"""Stacked caches: row i of one batch decodes exactly as configuration i's own batch-1 cache does.

The reference is each configuration decoded alone (greedy, batch 1): tokens must be equal and the logits
of every step close, for eviction caches of different budgets (ragged rows) and for coded caches, with a
question appended first (context-only mode) and with window flushes during decoding.
"""

from __future__ import annotations

import pytest
import torch

from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.eval.prefill import greedy_rows, prefill
from pyramidkv.eval.stacking import can_stack, stack_caches

IDS = torch.tensor([[1, *range(4, 60)]])
APPEND = torch.tensor([[7, 8, 9]])


def _logits_per_step(model, cache, logits, steps, append):
    """Greedy decoding that also returns every step's logits (rows x vocab)."""
    seen = []
    with torch.inference_mode():
        logits = model(append.expand(logits.shape[0], -1), **cache_kwargs(model, cache)).logits[
            :, -1
        ]
        for _ in range(steps):
            seen.append(logits.float())
            chosen = logits.argmax(-1, keepdim=True)
            logits = model(chosen, **cache_kwargs(model, cache)).logits[:, -1]
    return seen


@pytest.mark.parametrize(
    ("configs", "options"),
    [
        ([("pyramidkv", 8), ("snapkv", 16), ("h2o", 12), ("streamingllm", 10)], {}),
        ([("pyramidkv", 12), ("snapkv", 20)], {"codec": "fibquant:2", "residual": 3}),
    ],
    ids=["eviction", "fibquant"],
)
def test_stacked_rows_decode_as_their_own_caches(tiny_model, configs, options):
    captured = prefill(tiny_model, IDS)
    alone = []
    for policy, budget in configs:
        with captured.cache(policy, budget, **options) as cache:
            alone.append(_logits_per_step(tiny_model, cache, captured.logits, 6, APPEND))
    caches = [captured.cache(policy, budget, **options) for policy, budget in configs]
    assert can_stack(caches)
    with stack_caches(tiny_model, caches, **options) as stacked:
        together = _logits_per_step(
            tiny_model, stacked, captured.logits.expand(len(configs), -1), 6, APPEND
        )
    for row, steps in enumerate(alone):
        for step, logits in enumerate(steps):
            torch.testing.assert_close(together[step][row], logits[0], rtol=1e-4, atol=1e-4)
    for cache in caches:
        cache.close()


def test_greedy_rows_stop_each_row_at_its_own_stop_token(tiny_llama):
    captured = prefill(tiny_llama, IDS)
    caches = [captured.cache("snapkv", budget) for budget in (8, 24)]
    alone = [greedy_rows(tiny_llama, c, captured.logits, 8)[0] for c in caches]
    stop = alone[0][2]  # row 0 ends at its third token; row 1 runs on unless it meets that token
    with stack_caches(tiny_llama, [captured.cache("snapkv", b) for b in (8, 24)]) as stacked:
        rows = greedy_rows(tiny_llama, stacked, captured.logits, 8, stop_ids=[stop])
    for got, want in zip(rows, alone, strict=True):
        end = want.index(stop) + 1 if stop in want else len(want)
        assert got == want[:end]
    for cache in caches:
        cache.close()


def test_unstackable_caches_are_refused(tiny_llama):
    captured = prefill(tiny_llama, IDS)
    plain, coded = captured.cache("snapkv", 8), captured.cache("snapkv", 8, codec="fibquant:2")
    assert not can_stack([plain, coded])  # codecs differ
    with pytest.raises(ValueError, match="caches"):
        stack_caches(tiny_llama, [plain, coded])
    plain.close()
    coded.close()
