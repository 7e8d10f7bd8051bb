"""Memory budgets and the planner in the eval harness: ``--kv-memory`` sweeps budgets in bytes beside token
budgets, codec ``plan`` runs the memory planner at them, and each configuration's cache holds what it says."""

from __future__ import annotations

import pytest

from pyramidkv.cache.accounting import full_cache_nbytes
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.report import budget_order
from pyramidkv.eval.runner import Config, evaluate, make_configs
from pyramidkv.eval.tasks import make_samples

from .test_eval_runner import context_sensitive_tiny, options
from .test_eval_tasks import CharTokenizer


def test_memory_and_planned_configs_give_the_cache_its_arguments():
    assert Config("snapkv", "kv3%", "plan").cache_options() == {
        "policy": "snapkv", "kv_memory": "3%", "plan": "auto"
    }  # fmt: skip
    assert Config("pyramidkv", "kv48MiB", "plan:3+4").cache_options()["plan"] == "auto:3+4"
    assert Config("snapkv", "kv2%", "fibquant:3").cache_options() == {
        "policy": "snapkv", "kv_memory": "2%", "codec": "fibquant:3"
    }  # fmt: skip
    assert Config("snapkv", "64").cache_options() == {"policy": "snapkv", "budget": "64"}
    assert Config("full").cache_options() == {"policy": "full", "budget": "100%"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("snapkv", "10%", "plan"), "codec: 'plan' chooses tokens x bits under a memory budget"),
        (("snapkv", "kvlots"), "kv_memory: got 'lots'"),
        (("snapkv", "kv3%", "plan:3+9"), r"plan: bits must be rates in \(0, 8\]"),
        (("snapkv", "kv3%", "plan:x"), "plan: got 'auto:x'"),
    ],
)
def test_bad_memory_configs_are_refused(args, message):
    with pytest.raises(PyramidKVError, match=message):
        Config(*args)


def test_the_planner_takes_the_memory_budgets_of_a_sweep():
    configs = make_configs(["snapkv"], ["64", "kv3%"], codecs=["none", "plan"])
    assert [c.key for c in configs] == [
        "full/all/none", "snapkv/64/none", "snapkv/kv3%/none", "snapkv/kv3%/plan"
    ]  # fmt: skip
    with pytest.raises(PyramidKVError, match="codec: 'plan'"):
        make_configs(["snapkv"], ["64"], codecs=["plan"])


def test_memory_budgets_sort_after_token_and_share_budgets():
    budgets = ["kv48MiB", "all", "kv10%", "25%", "128", "kv2%", "64", "kv1MiB", "10%"]
    assert sorted(budgets, key=budget_order) == [
        "64", "128", "10%", "25%", "kv2%", "kv10%", "kv1MiB", "kv48MiB", "all"
    ]  # fmt: skip


def test_eval_options_sweep_kv_memory_beside_budgets(tmp_path):
    found = options(tmp_path, policy="snapkv", budget="8", kv_memory="3%,1MiB", codec="none,plan")
    assert [c.key for c in found.configs] == [
        "full/all/none", "snapkv/8/none", "snapkv/kv3%/none", "snapkv/kv1MiB/none",
        "snapkv/kv3%/plan", "snapkv/kv1MiB/plan",
    ]  # fmt: skip
    only = options(tmp_path, policy="snapkv", budget="", kv_memory="2%")
    assert [c.key for c in only.configs] == ["full/all/none", "snapkv/kv2%/none"]
    with pytest.raises(PyramidKVError, match="--kv-memory: got 'lots'"):
        options(tmp_path, kv_memory="lots")
    with pytest.raises(PyramidKVError, match="--budget: give budgets"):
        options(tmp_path, budget="")


def test_each_memory_configuration_holds_at_most_its_bytes():
    model, tok = context_sensitive_tiny(), CharTokenizer(template=True)
    samples = make_samples("passkey", tok, 600, 1, seed=0, mode="both")
    allowed = 200_000
    configs = make_configs(
        ["snapkv"], [f"kv{allowed}"], full=False, codecs=["none", "fibquant:2", "plan", "plan:3+4"]
    )
    records = evaluate(model, tok, samples, configs)
    slow = evaluate(model, tok, samples, configs, naive=True)
    assert len(records) == len(slow) == len(samples) * 4
    for fast, naive in zip(records, slow, strict=True):
        assert fast["tokens"] == naive["tokens"], fast["config"]
    for record in records:  # the one-prefill runner measures right after the prompt
        full = full_cache_nbytes(model.config, record["prompt_tokens"], 1, model.dtype)
        assert record["kv_bytes"] <= allowed < full, record["config"]
