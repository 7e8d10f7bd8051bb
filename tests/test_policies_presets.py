"""Named policies: what each preset is made of, overrides, and the errors a user sees."""

from __future__ import annotations

import pytest

from pyramidkv.policies import (
    POLICY_NAMES,
    AccumulatedAttentionScorer,
    KeyNormScorer,
    Policy,
    RandomScorer,
    SinksRecentScorer,
    WindowAttentionScorer,
    get_policy,
)
from pyramidkv.policies.adaptive import AdaptiveSchedule
from pyramidkv.policies.schedules import PyramidSchedule, UniformSchedule

EXPECTED = {
    "pyramidkv": (WindowAttentionScorer, PyramidSchedule),
    "snapkv": (WindowAttentionScorer, UniformSchedule),
    "adakv": (WindowAttentionScorer, UniformSchedule),
    "pyramidkv-adaptive": (WindowAttentionScorer, AdaptiveSchedule),
    "h2o": (AccumulatedAttentionScorer, UniformSchedule),
    "streamingllm": (SinksRecentScorer, UniformSchedule),
    "key-norm": (KeyNormScorer, UniformSchedule),
    "random": (RandomScorer, UniformSchedule),
}


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_presets_are_built_from_the_right_parts(name):
    policy = get_policy(name)
    assert isinstance(policy, Policy) and policy.name == name and policy.window == 8
    if name == "full":
        assert policy.is_full() and policy.scorer is None
        return
    scorer_cls, schedule_cls = EXPECTED[name]
    assert not policy.is_full()
    assert type(policy.scorer) is scorer_cls and type(policy.schedule) is schedule_cls
    assert policy.scorer.needs_all_queries == (name == "h2o")
    assert policy.heads == ("adaptive" if name == "adakv" else "uniform")


def test_pyramidkv_and_snapkv_differ_only_in_the_schedule():
    pyramid, snap = get_policy("pyramidkv"), get_policy("snapkv")
    assert pyramid.scorer == snap.scorer == WindowAttentionScorer(kernel_size=7, pooling="max")
    assert pyramid.window == snap.window == 8
    assert pyramid.schedule == PyramidSchedule(beta=20.0)


def test_overrides_reach_the_right_part():
    policy = get_policy("pyramidkv", window=16, kernel_size=5, pooling="avg", beta=10)
    assert policy.window == 16
    assert policy.scorer == WindowAttentionScorer(kernel_size=5, pooling="avg")
    assert policy.schedule == PyramidSchedule(beta=10)
    assert get_policy("streamingllm", sinks=2).scorer == SinksRecentScorer(sinks=2)
    assert get_policy("random", seed=3).scorer == RandomScorer(seed=3)
    assert get_policy("h2o", block_size=64).scorer == AccumulatedAttentionScorer(block_size=64)


def test_none_overrides_are_ignored_and_names_are_forgiving():
    assert get_policy("SnapKV", window=None, beta=None) == get_policy("snapkv")
    assert get_policy("key_norm").name == "key-norm"


@pytest.mark.parametrize("name", ["nope", "", "pyramid", 3])
def test_unknown_policy_lists_the_known_ones(name):
    with pytest.raises(ValueError, match="policy") as info:
        get_policy(name)
    assert all(known in str(info.value) for known in POLICY_NAMES)


@pytest.mark.parametrize(
    ("name", "overrides", "mentions"),
    [
        ("pyramidkv", {"windw": 8}, "windw"),
        ("snapkv", {"beta": 20}, "beta"),
        ("h2o", {"kernel_size": 7}, "kernel_size"),
        ("full", {"window": 8}, "window"),
        ("key-norm", {"seed": 1}, "seed"),
    ],
)
def test_unknown_override_is_named(name, overrides, mentions):
    with pytest.raises(ValueError, match=mentions):
        get_policy(name, **overrides)


@pytest.mark.parametrize(
    ("name", "overrides", "mentions"),
    [
        ("snapkv", {"window": 0}, "window"),
        ("snapkv", {"window": -3}, "window"),
        ("snapkv", {"window": 2.5}, "window"),
        ("snapkv", {"window": True}, "window"),
        ("snapkv", {"kernel_size": 4}, "kernel_size"),
        ("snapkv", {"kernel_size": 0}, "kernel_size"),
        ("snapkv", {"pooling": "mean"}, "pooling"),
        ("pyramidkv", {"beta": 0}, "beta"),
        ("pyramidkv", {"beta": 0.5}, "beta"),
        ("streamingllm", {"sinks": -1}, "sinks"),
        ("random", {"seed": -1}, "seed"),
        ("h2o", {"block_size": 0}, "block_size"),
    ],
)
def test_bad_override_values_are_named(name, overrides, mentions):
    with pytest.raises(ValueError, match=mentions) as info:
        get_policy(name, **overrides)
    assert repr(next(iter(overrides.values()))) in str(info.value)


def test_policy_layer_budgets():
    assert get_policy("full").layer_budgets(8, 3, 100) == [100, 100, 100]
    assert get_policy("snapkv").layer_budgets("10%", 2, 100) == [10, 10]
    pyramid = get_policy("pyramidkv").layer_budgets(128, 2, 1000)
    assert pyramid == [242, 14]  # k_min = 120/20 = 6, k_max = 240 - 6 = 234, plus the window of 8
