"""The quality-vs-bytes frontier: options are checked before a model loads, every cache holds at most its
budget's bytes, and a planned configuration is compared with the best fixed one on the same windows."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from pyramidkv.cache.accounting import full_cache_nbytes
from pyramidkv.cli.measure import frontier_command
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.frontier import FrontierOptions, run_frontier, summarize

from .test_eval_perplexity import one_thread, sharp_tiny  # noqa: F401 (one_thread: autouse fixture)
from .test_eval_tasks import CharTokenizer


def test_configurations_parse_into_cache_options():
    options = FrontierOptions(
        fixed="snapkv/none,pyramidkv/fibquant:3", planned="snapkv,pyramidkv-adaptive@auto:3+4"
    )
    assert options.configs == [
        ("snapkv", {"policy": "snapkv"}),
        ("pyramidkv + fibquant:3", {"policy": "pyramidkv", "codec": "fibquant:3"}),
        ("plan snapkv", {"policy": "snapkv", "plan": "auto"}),
        ("plan pyramidkv-adaptive auto:3+4", {"policy": "pyramidkv-adaptive", "plan": "auto:3+4"}),
    ]
    assert options.budgets == [0.01, 0.02, 0.03, 0.05, 0.10, 0.15, 0.25, 0.30]


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        (dict(shares="2,0"), "--shares"),
        (dict(shares="2,x"), "--shares"),
        (dict(fixed="snapkv/zip:2"), "--fixed"),
        (dict(fixed="pyramid/none"), "--fixed"),
        (dict(planned="snapkv@max"), "--planned"),
        (dict(planned="snapkv@auto:3+9"), "--planned"),
        (dict(fixed="", planned=""), "--fixed"),
        (dict(samples=0), "--samples"),
        (dict(context="1k,2k"), "--context"),
    ],
)
def test_bad_options_name_the_option(overrides, option):
    with pytest.raises(PyramidKVError, match=f"^{option}"):
        FrontierOptions(**overrides)


def test_the_planner_is_paired_with_the_best_fixed_configuration_on_the_same_windows():
    kl = {"a": [0.30, 0.20, 0.50], "b": [0.25, 0.35, 0.30], "plan p": [0.20, 0.10, 0.40]}
    records = [
        {"config": name, "share": 0.05, "sample": i, "kl": value, "top1": 0.9, "ppl": 2.0,
         "bytes_share": 0.05}
        for name, values in kl.items() for i, value in enumerate(values)
    ]  # fmt: skip
    records.append({"config": "b", "share": 0.05, "skipped": "below its smallest cache"})
    rows = {r["config"]: r for r in summarize(records, ["plan p"])}
    mine = rows["plan p"]
    assert mine["best_fixed"] == "b"  # mean 0.30 against a's 0.333
    diffs = [p - b for p, b in zip(kl["plan p"], kl["b"], strict=True)]
    half = 1.96 * statistics.stdev(diffs) / math.sqrt(3)
    assert mine["kl_vs_best"] == pytest.approx(statistics.fmean(diffs))
    assert mine["kl_vs_best_ci"] == pytest.approx(half)
    assert mine["kl_ratio"] == pytest.approx(statistics.fmean(kl["plan p"]) / 0.30)
    assert "best_fixed" not in rows["a"] and rows["b"]["samples"] == 3


def test_run_writes_a_frontier_whose_caches_hold_at_most_their_bytes(tmp_path):
    options = FrontierOptions(
        fixed="snapkv/none,snapkv/fibquant:2", planned="snapkv", shares="20,60",
        context="300", continuation="12", chunk=6, samples=2,
    )  # fmt: skip
    model = sharp_tiny()
    path = tmp_path / "frontier.json"
    with open("/dev/null", "w") as sink:
        result = run_frontier(model, CharTokenizer(), options, "tiny", path, Console(file=sink))
    saved = json.loads(path.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert path.with_suffix(".png").stat().st_size > 0
    full = full_cache_nbytes(model.config, 300, 1, torch.float16)
    measured = [r for r in saved["records"] if "skipped" not in r]
    assert {(r["config"], r["share"]) for r in measured} >= {("plan snapkv", 0.6), ("snapkv", 0.2)}
    for record in measured:
        assert record["bytes"] <= record["share"] * full, record
        assert record["kl"] >= 0 and 0 <= record["top1"] <= 1
    planned = [r for r in saved["rows"] if r["config"] == "plan snapkv"]
    assert planned and all("best_fixed" in r for r in planned)


def test_the_command_rejects_bad_options_before_loading_a_model():
    app = typer.Typer()
    app.command("frontier")(frontier_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["frontier", "--shares", "0", "--model", "/no/such/model"])
    assert isinstance(result.exception, PyramidKVError)
    assert str(result.exception).startswith("--shares")
