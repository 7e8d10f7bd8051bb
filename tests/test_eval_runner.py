"""The runner: one prefill per sample gives the answers of one generate per configuration; resume neither
redoes nor loses pairs; the command functions validate their options and redraw reports from saved results."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from pyramidkv.cli.evaluate import report_command
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.report import config_name
from pyramidkv.eval.results import RESULTS, read_records
from pyramidkv.eval.runner import Config, evaluate, make_configs
from pyramidkv.eval.sweep import EvalOptions, parse_lengths, run_eval
from pyramidkv.eval.tasks import make_samples

from .conftest import make_tiny
from .test_eval_tasks import CharTokenizer

CONFIGS = make_configs(["pyramidkv", "snapkv", "h2o", "streamingllm"], ["8", "32"])


def context_sensitive_tiny(family: str = "llama", scale: float = 4.0):
    """A tiny random model whose attention output outweighs the token embedding, so what the cache keeps
    changes the greedy answer (with the stock scale every configuration answers the same)."""
    model = make_tiny(family)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(scale)
    return model


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"), width=200)


@pytest.mark.parametrize(("family", "scale"), [("llama", 4.0), ("qwen2", 8.0)])
def test_one_prefill_runner_equals_one_generate_per_config(family, scale):
    model, tok = context_sensitive_tiny(family, scale), CharTokenizer(template=True)
    samples = make_samples("passkey", tok, 300, 2, seed=0, mode="both")
    fast = evaluate(model, tok, samples, CONFIGS)
    slow = evaluate(model, tok, samples, CONFIGS, naive=True)
    assert len(fast) == len(slow) == len(samples) * len(CONFIGS)
    for a, b in zip(fast, slow, strict=True):
        assert (a["sample"], a["config"]) == (b["sample"], b["config"])
        assert a["tokens"] == b["tokens"], (a["sample"], a["config"])
        assert (a["kv_bytes"], a["kept_tokens"]) == (b["kv_bytes"], b["kept_tokens"])
        assert a["runner"] == "one-prefill" and b["runner"] == "naive"
    for sample in samples:  # the comparison can fail: configurations do answer differently
        answers = {tuple(r["tokens"]) for r in fast if r["sample"] == sample.id}
        assert len(answers) >= 3, sample.id


def test_full_is_run_once_and_bytes_shrink_with_the_budget():
    model, tok = context_sensitive_tiny(), CharTokenizer()
    configs = make_configs(["full", "snapkv"], ["8", "64"])
    assert [c.key for c in configs] == ["full/all/none", "snapkv/8/none", "snapkv/64/none"]
    records = evaluate(model, tok, make_samples("needle", tok, 300, 1), configs)
    full, small, large = records
    assert full["kv_bytes"] >= full["full_kv_bytes"] > large["kv_bytes"] > small["kv_bytes"]
    assert (small["kept_tokens"], large["kept_tokens"]) == (8, 64)


def test_chunked_configurations_prefill_in_chunks():
    """A chunk as long as the prompt is one-shot compression and a budget above the prompt keeps it whole, so
    both answer as their one-forward references; small chunks under a small budget answer otherwise."""
    model, tok = context_sensitive_tiny(), CharTokenizer(template=True)
    samples = make_samples("passkey", tok, 300, 3, seed=0, mode="both")
    configs = make_configs(["snapkv"], ["32", "400"], chunks=[0, 1000, 64])
    assert [c.key for c in configs][:4] == [
        "full/all/none", "snapkv/32/none", "snapkv/400/none", "snapkv/32/none/chunk1000"
    ]  # fmt: skip
    records = {(r["sample"], r["config"]): r for r in evaluate(model, tok, samples, configs)}
    differ = 0
    for sample in samples:
        answer = {key: records[(sample.id, key)]["tokens"] for _, key in records if _ == sample.id}
        assert answer["snapkv/32/none/chunk1000"] == answer["snapkv/32/none"]
        assert answer["snapkv/400/none/chunk64"] == answer["full/all/none"]
        assert records[(sample.id, "snapkv/32/none/chunk64")]["prefill_chunk"] == 64
        assert records[(sample.id, "snapkv/32/none/chunk64")]["runner"] == "naive"
        differ += answer["snapkv/32/none/chunk64"] != answer["snapkv/32/none"]
    assert differ >= 1  # the chunks do change what is kept


def test_a_haystack_file_is_where_the_needle_hides(tmp_path):
    """--haystack FILE: needle and passkey prompts are cut from the user's text (in order, cycled when short),
    the run records the file, and a resume with another file is refused."""
    model, tok = context_sensitive_tiny(), CharTokenizer(template=True)
    mine = tmp_path / "mine.txt"
    mine.write_text("Zebras quietly graze.\n\nMarmots whistle at dawn.\n", encoding="utf-8")
    found = options(tmp_path / "out", lengths="300", samples=2, haystack=mine)
    for task in ("passkey", "needle"):
        samples = make_samples(task, tok, 300, 2, seed=0, haystack=found.haystack_text)
        text = tok.decode(samples[0].prompt_ids)
        assert "Zebras quietly graze." in text and "Marmots whistle at dawn." in text
        assert "grass is green" not in text and samples[0].metadata["haystack"] == "file"
    summary = run_eval(model, tok, found, "tiny", quiet())
    assert summary["run"]["corpus"].startswith("haystack file mine.txt (sha256 ")
    other = tmp_path / "other.txt"
    other.write_text("Something else entirely.", encoding="utf-8")
    with pytest.raises(PyramidKVError, match="--resume"):
        run_eval(
            model, tok, options(tmp_path / "out", resume=True, haystack=other), "tiny", quiet()
        )


def options(tmp_path, **overrides) -> EvalOptions:
    args = dict(
        task="passkey",
        policy="snapkv,streamingllm",
        budget="8,32",
        lengths="260,300",
        samples=2,
        mode="both",
        out=tmp_path,
    )
    return EvalOptions(**{**args, **overrides})


def test_resume_neither_redoes_nor_loses_pairs(tmp_path):
    model, tok = context_sensitive_tiny(), CharTokenizer(template=True)
    reference = tmp_path / "whole"
    run_eval(model, tok, options(reference), "tiny", quiet())
    whole = (reference / RESULTS).read_text().splitlines()
    assert (
        len(whole) == 2 * 2 * 2 * 5
    )  # lengths x samples x modes x (full + 2 policies x 2 budgets)

    killed = tmp_path / "killed"
    killed.mkdir()
    kept = 13
    (killed / RESULTS).write_text("\n".join(whole[:kept]) + "\n" + whole[kept][:40])
    summary = run_eval(model, tok, options(killed, resume=True), "tiny", quiet())
    resumed = (killed / RESULTS).read_text().splitlines()
    assert resumed[:kept] == whole[:kept]  # nothing done is redone or rewritten
    assert summary["run"]["invocations"][-1]["pairs"] == len(whole) - kept
    pairs = [(r["sample"], r["config"]) for r in map(json.loads, resumed)]
    assert len(pairs) == len(set(pairs)) == len(whole)  # nothing lost, nothing twice
    strip = ("prefill_s", "cache_s", "decode_s", "decode_rows")  # timing and batching
    same = [{k: v for k, v in json.loads(line).items() if k not in strip} for line in resumed]
    want = [{k: v for k, v in json.loads(line).items() if k not in strip} for line in whole]
    assert same == want


def test_resume_refuses_results_of_another_task(tmp_path):
    model, tok = context_sensitive_tiny(), CharTokenizer()
    run_eval(model, tok, options(tmp_path, lengths="260", samples=1), "tiny", quiet())
    with pytest.raises(PyramidKVError, match="--resume"):
        run_eval(model, tok, options(tmp_path, task="needle", resume=True), "tiny", quiet())


def test_report_redraws_summary_and_plots(tmp_path):
    model, tok = context_sensitive_tiny(), CharTokenizer()
    first = run_eval(model, tok, options(tmp_path, task="needle", samples=3), "tiny", quiet())
    pictures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert (
        "heatmap_needle_query-aware.png" in pictures and "bytes_needle_context-only.png" in pictures
    )
    for path in [*tmp_path.glob("*.png"), tmp_path / "summary.json"]:
        path.unlink()
    report_command(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == pictures
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["rows"] == json.loads(json.dumps(first["rows"]))
    assert again["run"]["corpus"].startswith("pydoc_data.topics")
    assert len(read_records(tmp_path)) == 2 * 3 * 2 * 5


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        (dict(task="nope"), "task"),
        (dict(lengths="3q"), "--lengths"),
        (dict(lengths="1k,,0"), "--lengths"),
        (dict(samples=0), "--samples"),
        (dict(mode="sideways"), "--mode"),
        (dict(policy="pyramid"), "--policy"),
        (dict(budget="64,0"), "--budget"),
        (dict(prefill_chunk="512,-1"), "--prefill-chunk"),
        (dict(prefill_chunk="x"), "--prefill-chunk"),
        (dict(prefill_chunk="64x0.5"), "--prefill-chunk"),
        (dict(prefill_chunk="0x4"), "--prefill-chunk"),
        (dict(haystack="/nonexistent/hay.txt"), "--haystack"),
        (dict(task="ruler", haystack=__file__), "--haystack"),
    ],
)
def test_bad_options_name_the_option(tmp_path, overrides, option):
    with pytest.raises(PyramidKVError, match=option):
        options(tmp_path, **overrides)


def test_lengths_and_configs_parse(tmp_path):
    assert parse_lengths("1k, 2k,7.5k,1500") == [1000, 2000, 7500, 1500]
    configs = options(
        tmp_path, policy="snapkv", budget="10%", prefill_chunk="0,1000,1000x4"
    ).configs
    assert [c.key for c in configs] == [
        "full/all/none", "snapkv/10%/none", "snapkv/10%/none/chunk1000", "snapkv/10%/none/chunk1000x4"
    ]  # fmt: skip
    assert configs[-1].cache_options() == {
        "policy": "snapkv", "budget": "10%", "prefill_chunk": 1000, "prefill_headroom": 4.0
    }  # fmt: skip
    assert configs[-1].fields()["prefill_headroom"] == 4.0
    assert config_name("snapkv", "none", 1000, 4.0) == "snapkv chunk 1000x4"
    assert Config("snapkv", "10%").key == "snapkv/10%/none"
    assert Config("full", "64").key == "full/all/none"


def test_command_line_error_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pyramidkv", "eval", "passkey", "--lengths", "3q"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "--lengths" in lines[0], done.stderr


@pytest.mark.slow
def test_one_prefill_equals_naive_on_the_embedded_model(smollm2):
    model, tokenizer = smollm2
    samples = make_samples("passkey", tokenizer, 1000, 1, seed=0, mode="both")
    configs = make_configs(["pyramidkv", "snapkv"], ["64"])
    fast = evaluate(model, tokenizer, samples, configs)
    slow = evaluate(model, tokenizer, samples, configs, naive=True)
    assert [r["tokens"] for r in fast] == [r["tokens"] for r in slow]
    assert [r["kv_bytes"] for r in fast] == [r["kv_bytes"] for r in slow]
    assert fast[0]["score"] == 1.0  # the full cache finds the key
