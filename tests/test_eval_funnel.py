"""The attention funnel: entropy and top-mass against a float64 reference written from the definition, the
two extremes (uniform and one-hot attention), and the command's outputs on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console

from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.funnel import attention_funnel, measure, summarize
from pyramidkv.eval.measure import run_funnel

from .conftest import make_tiny
from .test_eval_perplexity import one_thread  # noqa: F401 - autouse: tiny models on one thread
from .test_eval_tasks import CharTokenizer


def reference(queries, keys, scaling, last, percents):
    """Loops over batch, heads and queries: softmax over the causal prefix, entropy / log(n), top-x% mass."""
    q, k = queries.double().numpy(), keys.double().numpy()
    batch, heads, n, _ = q.shape
    group = heads // k.shape[1]
    sums = {"entropy": np.zeros(heads), **{f"top{x}%": np.zeros(heads) for x in percents}}
    for b in range(batch):
        for h in range(heads):
            for p in range(n - last, n):
                scores = k[b, h // group, : p + 1] @ q[b, h, p] * scaling
                a = np.exp(scores - scores.max())
                a /= a.sum()
                sums["entropy"][h] += -sum(x * math.log(x) for x in a if x > 0) / math.log(p + 1)
                ranked = sorted(a, reverse=True)
                for x in percents:
                    sums[f"top{x}%"][h] += sum(ranked[: max(1, math.ceil(x * (p + 1) / 100))])
    return {name: value / (batch * last) for name, value in sums.items()}


@pytest.mark.parametrize(("heads", "kv_heads", "n", "last"), [(4, 2, 150, 20), (3, 3, 200, 7)])
def test_statistics_match_the_definition(heads, kv_heads, n, last):
    gen = torch.Generator().manual_seed(n)
    queries = torch.randn(2, heads, n, 8, generator=gen)
    queries *= torch.linspace(0.1, 4.0, heads).view(1, heads, 1, 1)  # flat to peaked heads
    keys = torch.randn(2, kv_heads, n, 8, generator=gen)
    found = attention_funnel(queries, keys, 0.35, last, (1, 10, 25))
    expected = reference(queries, keys, 0.35, last, (1, 10, 25))
    assert set(found) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(found[name].numpy(), value, rtol=1e-10, atol=1e-12)


def test_uniform_and_one_hot_attention_are_the_extremes():
    n, last = 120, 10
    uniform = attention_funnel(torch.zeros(1, 2, n, 4), torch.randn(1, 1, n, 4), 1.0, last)
    counts = torch.arange(n - last + 1, n + 1).double()
    assert uniform["entropy"].tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    top1 = ((counts + 99) // 100 / counts).mean().item()  # ceil(n / 100) tokens of 1/n each
    assert uniform["top1%"].tolist() == pytest.approx([top1] * 2, abs=1e-12)
    keys = torch.zeros(1, 1, n, 4)
    keys[0, 0, 0, 0] = 1.0  # every query sees token 0, and only token 0 scores
    peaked = attention_funnel(torch.ones(1, 1, n, 4), keys, 1e4, last)
    assert peaked["entropy"].item() == pytest.approx(0.0, abs=1e-9)
    assert peaked["top1%"].item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"last": 50}, "queries"), ({"last": 0}, "queries"), ({"percents": (0,)}, "percents")],
)
def test_bad_arguments_are_named(kwargs, match):
    args = {"last": 5, "percents": (1, 10), **kwargs}
    with pytest.raises(PyramidKVError, match=match):
        attention_funnel(torch.randn(1, 2, 50, 4), torch.randn(1, 2, 50, 4), 1.0, **args)
    with pytest.raises(PyramidKVError, match="keys"):
        attention_funnel(torch.randn(1, 3, 50, 4), torch.randn(1, 2, 50, 4), 1.0, 5)


def test_model_statistics_come_from_the_prefill_and_are_summarized_per_layer():
    model = make_tiny("qwen2")
    windows = [torch.randint(3, 97, (1, 80), generator=torch.Generator().manual_seed(i)) for i in range(2)]  # fmt: skip
    records = measure(model, windows, last=16)
    assert len(records[0]["entropy"]) == 4 and len(records[0]["entropy"][0]) == 4  # layers x heads
    rows = summarize(records)
    per_prompt = [sum(r["top10%"][2]) / 4 for r in records]
    assert rows[2]["top10%"] == pytest.approx(sum(per_prompt) / 2)
    assert rows[2]["top10%_std"] == pytest.approx(abs(per_prompt[0] - per_prompt[1]) / math.sqrt(2))
    assert all(0 < r["entropy"] <= 1 and r["top1%"] <= r["top10%"] <= 1 for r in rows)


def test_command_writes_json_and_png(tmp_path):
    with open("/dev/null", "w") as sink:
        run_funnel(make_tiny(), CharTokenizer(), 120, 8, 2, 0, tmp_path, "tiny", Console(file=sink))
    saved = json.loads((tmp_path / "funnel.json").read_text())
    assert [r["layer"] for r in saved["rows"]] == [0, 1, 2, 3]
    assert saved["run"]["length"] == 120 and len(saved["records"]) == 2
    assert (tmp_path / "funnel.png").stat().st_size > 0
