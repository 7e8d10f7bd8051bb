"""Adaptive budgets: head-shared (Ada-KV) and per-layer from the window's attention (CAKE), against slow
references written here, and through the caches (dynamic, coded, static)."""

from __future__ import annotations

import math

import pytest
import torch

from pyramidkv import CompressedCache, StaticCompressedCache, get_policy
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.errors import PyramidKVError
from pyramidkv.policies.adaptive import AdaptiveSchedule, preference
from pyramidkv.policies.heads import head_budgets


def ref_head_budgets(scores, valid, budgets, window, floor):
    """Per row: each head's best ``least`` tokens are its own; the rest of the row's ``budget x heads`` go to
    the best remaining (head, token) pairs of any head, one at a time (float64, loops)."""
    batch, heads, n = scores.shape
    out = torch.zeros(batch, heads, dtype=torch.long)
    for b in range(batch):
        real = [j for j in range(n) if valid[b, j]]
        keep = min(int(budgets[b]), len(real))
        least = min(keep, max(math.ceil(keep * floor), min(keep, window)))
        pool = []
        for h in range(heads):
            ranked = sorted(real, key=lambda j, h=h: -float(scores[b, h, j]))
            out[b, h] = least
            pool += [(float(scores[b, h, j]), h) for j in ranked[least:]]
        pool.sort(key=lambda item: -item[0])
        for _, h in pool[: keep * heads - least * heads]:
            out[b, h] += 1
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("floor", [0.0, 0.2, 1.0])
def test_head_budgets_match_a_layer_wide_top_k(seed, floor):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, 4, 30, generator=generator, dtype=torch.float64)
    scores[0, 1] *= 5  # one head far more concentrated than the others
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :7] = False  # a left-padded row
    budgets = torch.tensor([6, 9])
    got = head_budgets(scores.float(), valid, budgets, window=2, floor=floor)
    assert torch.equal(got, ref_head_budgets(scores, valid, budgets, 2, floor))
    assert got.sum(dim=1).tolist() == [6 * 4, 9 * 4]  # the layer's total is the uniform split's
    if floor == 1.0:
        assert torch.equal(got, budgets[:, None].expand(2, 4))


def test_head_budgets_favour_the_head_that_needs_more():
    scores = torch.zeros(1, 2, 40)
    scores[0, 0, :20] = torch.linspace(1, 0.9, 20)  # dispersed: many tokens matter
    scores[0, 1, :2] = 1.0  # focused: two tokens matter
    got = head_budgets(scores, torch.ones(1, 40, dtype=torch.bool), torch.tensor([10]), 1, 0.2)
    assert got[0, 0] > got[0, 1] and int(got.sum()) == 20


def ref_preference(queries, keys, valid, scaling):
    """CAKE's H x V from the window's attention, float64, one head at a time."""
    batch, q_heads, window, _ = queries.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    first = n - window
    found = torch.zeros(batch, dtype=torch.float64)
    for b in range(batch):
        total = 0.0
        for h in range(q_heads):
            k = keys[b, h // (q_heads // kv_heads)].double()
            rows = []
            for i in range(window):
                logits = (queries[b, h, i].double() @ k.T) * scaling
                sees = torch.tensor([j <= first + i and bool(valid[b, j]) for j in range(n)])
                probs = torch.softmax(logits.masked_fill(~sees, -math.inf), dim=-1)
                rows.append(probs[:first])
            rows = torch.stack(rows)
            mean = rows.mean(dim=0)
            share = mean / mean.sum()
            entropy = -sum(float(p) * math.log(float(p)) for p in share if p > 0)
            shift = float(rows.var(dim=0, unbiased=False).sum())
            total += entropy * shift
        found[b] = total / q_heads
    return found


def test_the_preference_is_entropy_times_variance_of_the_window_attention():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 4, 3, 8, generator=generator)
    keys = torch.randn(2, 2, 20, 8, generator=generator)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :5] = False
    got = preference(queries, keys, valid, 0.35, 1.0, 1.0)
    torch.testing.assert_close(
        got.double(), ref_preference(queries, keys, valid, 0.35), rtol=1e-4, atol=0
    )


def _allocate(preferences: list[float], average: int, n: int, window: int = 2) -> list[int]:
    schedule = AdaptiveSchedule()
    progress = schedule.start(1)
    found = []
    for p in preferences:
        (budget,) = schedule.next_budgets(progress, [p], [average], [n], len(preferences), window)
        found.append(budget)
    return found


def test_the_adaptive_allocation_is_causal_exact_and_uniform_when_layers_agree():
    assert _allocate([1.0] * 6, 20, 500) == [20] * 6
    budgets = _allocate([1.0, 3.0, 0.5, 2.0, 1.0, 4.0], 20, 500)
    assert sum(budgets) == 6 * 20 and budgets[1] > budgets[2]
    # a layer's budget never depends on the layers above it
    changed = _allocate([1.0, 3.0, 0.5, 9.0, 0.1, 0.1], 20, 500)
    assert changed[:3] == budgets[:3]
    assert min(_allocate([0.0, 5.0, 0.0, 0.0], 10, 500)) >= 2  # every layer keeps its window
    assert _allocate([1.0, 1.0], 50, 40) == [40, 40]  # a budget beyond the prompt keeps it whole


def test_every_scorer_takes_the_adaptive_options():
    policy = get_policy("h2o", schedule="adaptive", heads="adaptive", head_floor=0.5, tau1=2.0)
    assert policy.schedule.adaptive and policy.heads == "adaptive" and policy.head_floor == 0.5
    assert get_policy("adakv").heads == "adaptive" and not get_policy("adakv").schedule.adaptive
    assert get_policy("pyramidkv-adaptive").schedule.adaptive
    with pytest.raises(PyramidKVError, match="schedule: got 'steep'"):
        get_policy("snapkv", schedule="steep")
    with pytest.raises(PyramidKVError, match="head_floor: not an option of policy 'snapkv'"):
        get_policy("snapkv", head_floor=0.3)
    with pytest.raises(PyramidKVError, match="tau1"):
        get_policy("pyramidkv-adaptive", tau1=0)


PROMPT = torch.randint(3, 97, (2, 90), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("policy", ["adakv", "pyramidkv-adaptive", "adaptive-both"])
@pytest.mark.parametrize("codec", [None, "fibquant:2"])
def test_adaptive_caches_hold_the_budget_and_decode_as_their_static_copy(tiny_llama, policy, codec):
    """The layer totals are the uniform split's (20 x 2 heads per row; adaptive layers sum to 4 x 20 x 2), the
    rows are ragged per head, and the CUDA-graph path's static copy (run eagerly here) decodes the same
    greedy tokens as the dynamic cache."""
    tiny_llama.generation_config.eos_token_id = None
    options = {"heads": "adaptive"} if policy == "adaptive-both" else {}
    name = "pyramidkv-adaptive" if policy == "adaptive-both" else policy
    with torch.no_grad(), CompressedCache(tiny_llama, name, 20, codec=codec, **options) as cache:
        out = tiny_llama(PROMPT, **cache_kwargs(tiny_llama, cache))
        kept = cache.kept_tokens()  # (layers, batch, kv_heads)
        assert kept.sum(dim=(0, 2)).tolist() == [4 * 20 * 2] * 2
        if policy != "pyramidkv-adaptive":  # shared heads: some layer splits its budget unevenly
            assert bool((kept != kept[..., :1]).any())
        if policy != "adakv":  # adaptive layers: some layer keeps more than another
            assert bool((kept.sum(dim=2) != kept.sum(dim=2)[:1]).any())
        if policy == "adakv":
            assert kept.sum(dim=2).eq(40).all()
        static = StaticCompressedCache(tiny_llama, cache, max_new_tokens=4)
        token = out.logits[:, -1:].argmax(-1)
        position = torch.full((2, 1), PROMPT.shape[1])
        dynamic = tiny_llama(token, position_ids=position, **cache_kwargs(tiny_llama, cache))
        replay = tiny_llama(token, position_ids=position, **cache_kwargs(tiny_llama, static))
        torch.testing.assert_close(replay.logits, dynamic.logits, rtol=1e-4, atol=1e-4)


def test_a_byte_budget_is_refused_for_shared_heads(tiny_llama):
    with pytest.raises(
        PyramidKVError, match="kv_memory: policy 'adakv' shares each layer's budget"
    ):
        CompressedCache(tiny_llama, "adakv", kv_memory="5%")
    with (
        torch.no_grad(),
        CompressedCache(tiny_llama, "pyramidkv-adaptive", kv_memory="20%") as cache,
    ):
        tiny_llama(PROMPT, **cache_kwargs(tiny_llama, cache))
        one_token_per_layer = 1 / PROMPT.shape[1]
        assert 0.2 - one_token_per_layer <= cache.memory_report()["prompt_share"] <= 0.2
