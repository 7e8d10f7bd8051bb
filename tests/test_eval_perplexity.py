"""Perplexity with a compressed past: the full cache reproduces a plain forward; KL is 0 for the full cache and
grows when eviction drops what the continuation attends to; the command validates its options and writes
its outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import typer
from rich.console import Console
from transformers import DynamicCache
from typer.testing import CliRunner

from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cli.measure import fidelity_command, funnel_command, perplexity_command
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval import corpus
from pyramidkv.eval.measure import MeasureOptions, run_measure
from pyramidkv.eval.perplexity import (
    PerplexityTask,
    kl_divergence,
    measure_sample,
    summarize,
    text_windows,
)
from pyramidkv.eval.runner import Config

from .conftest import make_tiny
from .test_eval_runner import context_sensitive_tiny
from .test_eval_tasks import CharTokenizer

TASK = PerplexityTask(context=40, continuation=23, chunk=5)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared, loaded CPU OpenMP's waiting makes their many
    small matmuls a hundred times slower; run them on one thread and restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sharp_tiny():
    """A tiny model whose attention output matters (see test_eval_runner) and whose next-token distributions
    are peaked (lm_head x 10), so what the cache loses shows up as KL well above float noise."""
    model = context_sensitive_tiny()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model


def window(seed: int = 0, length: int = TASK.length) -> torch.Tensor:
    return torch.randint(3, 97, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_full_cache_perplexity_equals_a_plain_forward(family):
    model, ids = make_tiny(family), window()
    (record,) = measure_sample(model, ids, [Config("full")], TASK)
    with torch.no_grad():
        logits = (
            model(ids, **cache_kwargs(model, DynamicCache(config=model.config))).logits[0].double()
        )
    c, t = TASK.context, TASK.continuation
    targets = ids[0, c + 1 : c + t + 1]
    nll = -torch.log_softmax(logits[c : c + t], -1).gather(-1, targets[:, None]).mean().item()
    assert record["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert record["full_nll"] == pytest.approx(nll, rel=1e-6)
    assert record["kl"] == 0.0 and record["top1"] == 1.0


def test_chunk_size_does_not_change_the_full_cache_result():
    model, ids = make_tiny(), window(1)
    found = [
        measure_sample(model, ids, [Config("full")], PerplexityTask(40, 23, chunk))[0]["nll"]
        for chunk in (1, 7, 23)
    ]
    assert found == pytest.approx([found[0]] * 3, rel=1e-6)


def test_kl_is_zero_without_loss_and_positive_when_the_budget_shrinks():
    model, ids = sharp_tiny(), window(2)
    configs = [Config("full"), Config("snapkv", str(TASK.context)), Config("snapkv", "4")]
    full, whole, small = measure_sample(model, ids, configs, TASK)
    assert full["kl"] == whole["kl"] == 0.0  # a budget of the whole prompt keeps everything
    assert whole["ppl"] == pytest.approx(full["ppl"], rel=1e-9)
    assert small["kl"] > 1e-4 and small["top1"] < 1.0 and small["ppl"] != full["ppl"]
    assert small["kv_bytes"] < whole["kv_bytes"]


def test_a_quantized_past_moves_the_distribution():
    model, ids = sharp_tiny(), window(3)
    full, coded = measure_sample(
        model, ids, [Config("full"), Config("full", codec="turboquant:2")], TASK
    )
    assert coded["kl"] > 1e-5 and coded["ratio"] > full["ratio"]


def test_kl_divergence_matches_its_definition():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 3, (5, 11)), rng.normal(0, 3, (5, 11))
    p = np.exp(a - a.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(b - b.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    expected = [sum(p[i, j] * math.log(p[i, j] / q[i, j]) for j in range(11)) for i in range(5)]
    found = kl_divergence(torch.tensor(a, dtype=torch.float32), torch.tensor(b)).tolist()
    assert found == pytest.approx(expected, rel=1e-5)
    assert kl_divergence(torch.tensor(a), torch.tensor(a)).abs().max().item() == 0.0


def test_windows_are_disjoint_slices_of_the_corpus_starting_with_bos():
    tok = CharTokenizer()
    tok.bos_token_id = 1
    windows = text_windows(tok, 300, 3, seed=5)
    text = "\n\n".join(corpus.shuffled_paragraphs(5))
    assert [w.shape for w in windows] == [torch.Size([1, 300])] * 3
    assert all(w[0, 0].item() == 1 for w in windows)
    assert tok.decode(torch.cat([w[0, 1:] for w in windows]).tolist()) == tok.decode(
        tok(text[:2000], add_special_tokens=False)["input_ids"][: 3 * 299]
    )
    with pytest.raises(PyramidKVError, match="samples"):
        text_windows(tok, 100_000, 5)


def test_windows_of_a_users_text_read_it_in_order(tmp_path):
    tok = CharTokenizer()
    text = "".join(chr(97 + i % 26) for i in range(1000))
    windows = text_windows(tok, 200, 4, text=text)
    assert tok.decode(torch.cat([w[0] for w in windows]).tolist()) == text[:800]
    with pytest.raises(PyramidKVError, match="the text has"):
        text_windows(tok, 400, 4, text=text)
    with pytest.raises(PyramidKVError, match=r"--text: .* is not a readable file"):
        MeasureOptions(text=tmp_path / "missing.txt")


def test_summary_pools_nll_and_pairs_the_gap():
    base = dict(policy="snapkv", budget="8", codec="none", config="snapkv/8/none", context=4)
    base.update(continuation=2, kv_bytes=10, full_fp16_bytes=40, ratio=4.0, ratio_codes_only=4.0)
    records = [
        {**base, "nll": 1.0, "ppl": math.e, "full_nll": 0.5, "kl": 0.1, "top1": 1.0, "seconds": 1},
        {
            **base,
            "nll": 2.0,
            "ppl": math.e**2,
            "full_nll": 1.0,
            "kl": 0.3,
            "top1": 0.5,
            "seconds": 1,
        },
    ]
    (row,) = summarize(records)
    gaps = [math.e - math.exp(0.5), math.e**2 - math.e]
    assert row["ppl"] == pytest.approx(math.exp(1.5))
    assert row["ppl_gap"] == pytest.approx(sum(gaps) / 2)
    assert row["ppl_gap_std"] == pytest.approx(abs(gaps[0] - gaps[1]) / math.sqrt(2))
    assert (row["kl"], row["top1"], row["n"]) == (pytest.approx(0.2), 0.75, 2)


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"context": "abc"}, "--context"),
        ({"continuation": "1k,2k"}, "--continuation"),
        ({"samples": 0}, "--samples"),
        ({"chunk": 0}, "--chunk"),
        ({"codec": "zip:2"}, "--codec"),
        ({"policy": "nope"}, "--policy"),
        ({"budget": "lots"}, "--budget"),
    ],
)
def test_options_name_the_bad_option(overrides, option):
    with pytest.raises(PyramidKVError, match=f"^{option}"):
        MeasureOptions(**overrides)


def test_command_writes_json_and_png(tmp_path):
    options = MeasureOptions(
        "full,snapkv", "8", "none", "60", "20", 8, samples=2, out=tmp_path / "ppl"
    )
    with open("/dev/null", "w") as sink:
        result = run_measure(
            "perplexity", sharp_tiny(), CharTokenizer(), options, "tiny", Console(file=sink)
        )
    saved = json.loads((tmp_path / "ppl" / "perplexity.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert [r["config"] for r in saved["rows"]] == ["full/all/none", "snapkv/8/none"]
    assert len(saved["records"]) == 4 and saved["run"]["context"] == 60
    assert (tmp_path / "ppl" / "perplexity.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("command", "args", "option"),
    [
        ("perplexity", ["--context", "1k,2k"], "--context"),
        ("fidelity", ["--codec", "fibquant:x"], "--codec"),
        ("funnel", ["--length", "100", "--queries", "100"], "--queries"),
        ("funnel", ["--samples", "0"], "--samples"),
    ],
)
def test_commands_reject_bad_options_before_loading_a_model(command, args, option):
    app = typer.Typer()
    app.command("perplexity")(perplexity_command)
    app.command("fidelity")(fidelity_command)
    app.command("funnel")(funnel_command)
    result = CliRunner().invoke(app, [command, *args, "--model", "/no/such/model"])
    assert isinstance(result.exception, PyramidKVError)
    assert str(result.exception).startswith(option)
