"""Attention fidelity: the full cache against itself scores exactly 1 at every layer, a compressed cache less;
the isolated per-layer cosine equals one computed from the definition out of a full prefill's tensors; the
hooks are gone afterwards."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from pyramidkv.eval.fidelity import attention_modules, measure_sample, summarize
from pyramidkv.eval.measure import MeasureOptions, run_measure
from pyramidkv.eval.perplexity import PerplexityTask
from pyramidkv.eval.prefill import prefill
from pyramidkv.eval.runner import Config

from .test_eval_perplexity import one_thread  # noqa: F401 - autouse: tiny models on one thread
from .test_eval_runner import context_sensitive_tiny
from .test_eval_tasks import CharTokenizer

TASK = PerplexityTask(context=40, continuation=14, chunk=4)
IDS = torch.randint(3, 97, (1, TASK.length), generator=torch.Generator().manual_seed(0))


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in attention_modules(model))


@pytest.mark.parametrize("isolate", [True, False])
def test_full_against_full_is_one_and_compression_is_less(tiny_model, isolate):
    configs = [Config("full"), Config("snapkv", str(TASK.context)), Config("snapkv", "4")]
    full, whole, small = measure_sample(tiny_model, IDS, configs, TASK, isolate=isolate)
    assert full["cosine"] == pytest.approx([1.0] * 4, abs=1e-12)
    assert whole["cosine"] == pytest.approx([1.0] * 4, abs=1e-12)
    assert all(c < 1 - 1e-4 for c in small["cosine"])
    assert no_hooks(tiny_model)


def test_isolated_and_end_to_end_agree_at_the_bottom_layer_only():
    model = context_sensitive_tiny()
    configs = [Config("snapkv", "4")]
    (isolated,) = measure_sample(model, IDS, configs, TASK, isolate=True)
    (drifted,) = measure_sample(model, IDS, configs, TASK, isolate=False)
    assert isolated["cosine"][0] == pytest.approx(drifted["cosine"][0], abs=1e-9)
    assert any(
        abs(a - b) > 1e-4
        for a, b in zip(isolated["cosine"][1:], drifted["cosine"][1:], strict=True)
    )


def attend(query, keys, values, scaling):
    """softmax(q K^T) V per head in float64; query (heads, t, d) sees all of keys/values (kv_heads, s, d)."""
    group = query.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    weights = torch.softmax(query.double() @ keys.double().transpose(-1, -2) * scaling, -1)
    return weights @ values.double()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_isolated_cosine_equals_the_definition(family):
    """Layer l, fed the full run's inputs, attends over (kept context tokens + continuation so far) instead of
    (whole context + continuation so far); both outputs are rebuilt here from one full prefill's tensors."""
    model = context_sensitive_tiny(family)
    c, t = TASK.context, TASK.continuation
    (record,) = measure_sample(model, IDS, [Config("snapkv", "6")], TASK)
    whole = prefill(model, IDS[:, : c + t])
    with prefill(model, IDS[:, :c]).cache("snapkv", 6) as cache:
        kept = [(layer.kept_keys[0], layer.kept_values[0]) for layer in cache.layers]
    for layer, module in enumerate(attention_modules(model)):
        q, k, v = whole.queries[layer][0], whole.keys[layer][0], whole.values[layer][0]
        full_out, kept_out = [], []
        for i in range(c, c + t):
            full_out.append(attend(q[:, i : i + 1], k[:, : i + 1], v[:, : i + 1], whole.scaling))
            keys = torch.cat([kept[layer][0], k[:, c : i + 1]], 1)
            values = torch.cat([kept[layer][1], v[:, c : i + 1]], 1)
            kept_out.append(attend(q[:, i : i + 1], keys, values, whole.scaling))
        weight = module.o_proj.weight.double()

        def project(outs, weight=weight):
            return torch.cat(outs, 1).transpose(0, 1).reshape(t, -1) @ weight.T

        expected = torch.cosine_similarity(project(full_out), project(kept_out), dim=-1).mean()
        assert record["cosine"][layer] == pytest.approx(expected.item(), abs=1e-5), layer


def test_summary_averages_layers_over_samples():
    base = dict(config="c", policy="snapkv", budget="4", codec="none", isolate=True, ratio=2.0)
    records = [
        {**base, "cosine": [1.0, 0.8], "cosine_min": [0.9, 0.5]},
        {**base, "cosine": [0.9, 0.6], "cosine_min": [0.8, 0.4]},
    ]
    (row,) = summarize(records)
    assert row["cosine"] == pytest.approx([0.95, 0.7])
    assert (row["worst_layer"], row["min_token_cosine"], row["n"]) == (1, 0.4, 2)
    assert row["mean_cosine"] == pytest.approx(0.825)


def test_command_writes_json_and_png(tmp_path):
    options = MeasureOptions("full,snapkv", "8", "none", "60", "12", 4, samples=1, out=tmp_path)
    model = context_sensitive_tiny()
    with open("/dev/null", "w") as sink:
        run_measure("fidelity", model, CharTokenizer(), options, "tiny", Console(file=sink))
    saved = json.loads((tmp_path / "fidelity.json").read_text())
    assert [r["config"] for r in saved["rows"]] == ["full/all/none", "snapkv/8/none"]
    assert len(saved["rows"][1]["cosine"]) == 4 and saved["run"]["isolate"] is True
    assert (tmp_path / "fidelity.png").stat().st_size > 0
    assert no_hooks(model)
