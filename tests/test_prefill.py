"""One prefill, many caches: each rebuilt cache equals the cache of a fresh prefill with that policy."""

from __future__ import annotations

import pytest
import torch

from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.eval.prefill import greedy_rows, prefill

IDS = torch.tensor([[1, *range(4, 70)]])


@pytest.mark.parametrize(
    ("policy", "budget"), [("pyramidkv", 12), ("snapkv", "20%"), ("h2o", 16), ("full", 8)]
)
def test_rebuilt_cache_equals_fresh_prefill(tiny_model, policy, budget):
    captured = prefill(tiny_model, IDS)
    rebuilt = captured.cache(policy, budget)
    with torch.no_grad(), CompressedCache(tiny_model, policy=policy, budget=budget) as fresh:
        logits = tiny_model(IDS, **cache_kwargs(tiny_model, fresh)).logits[:, -1]
        torch.testing.assert_close(captured.logits, logits)
        for a, b in zip(rebuilt.layers, fresh.layers, strict=True):
            assert torch.equal(a.lengths, b.lengths)
            torch.testing.assert_close(a.kept_keys, b.kept_keys)
            torch.testing.assert_close(a.kept_values, b.kept_values)
        assert rebuilt.nbytes() == fresh.nbytes()
    rebuilt.close()


def test_greedy_rows_equal_generate(tiny_llama):
    captured = prefill(tiny_llama, IDS)
    with captured.cache("snapkv", 16) as cache:
        ours = greedy_rows(tiny_llama, cache, captured.logits, 6)[0]
    with CompressedCache(tiny_llama, policy="snapkv", budget=16) as cache:
        out = tiny_llama.generate(
            IDS,
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            **cache_kwargs(tiny_llama, cache),
        )
    assert ours == out[0, IDS.shape[1] :].tolist()


def test_captured_tensors_survive_many_caches(tiny_llama):
    captured = prefill(tiny_llama, IDS)
    before = [k.clone() for k in captured.keys]
    for budget in (8, 16, 32):
        with captured.cache("pyramidkv", budget) as cache:
            greedy_rows(tiny_llama, cache, captured.logits, 3, append_ids=torch.tensor([[5, 6]]))
    assert all(torch.equal(a, b) for a, b in zip(before, captured.keys, strict=True))


def test_scores_shared_across_budgets_and_policies_change_nothing(tiny_llama):
    """Caches built one after another from one capture reuse its scores (Prefill.scores); each must still
    equal a fresh prefill with its own policy and budget."""
    captured = prefill(tiny_llama, IDS)
    configs = [("h2o", 8), ("snapkv", 16), ("pyramidkv", 12), ("h2o", 24), ("snapkv", 8)]
    for policy, budget in configs:
        with (
            captured.cache(policy, budget) as rebuilt,
            torch.no_grad(),
            CompressedCache(tiny_llama, policy=policy, budget=budget) as fresh,
        ):
            tiny_llama(IDS, **cache_kwargs(tiny_llama, fresh))
            for a, b in zip(rebuilt.layers, fresh.layers, strict=True):
                assert torch.equal(a.lengths, b.lengths)
                torch.testing.assert_close(a.kept_keys, b.kept_keys)
    # snapkv and pyramidkv share one scorer and window: one entry per layer for both, one for h2o
    layers = tiny_llama.config.num_hidden_layers
    assert len(captured.scores) == 2 * layers
