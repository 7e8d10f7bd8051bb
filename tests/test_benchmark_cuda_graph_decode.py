"""``benchmarks/cuda_graph_decode.py --smoke``: the CPU run the lead checks before the GPU one.

No graph and no timing claims on a CPU; what must hold is the record: every cache and batch measured in the
two eager modes, the static cache's greedy tokens equal to the dynamic cache's (a float32 tiny model with
clear-cut logits, so any difference is a bug), the JSON written and complete, bad options refused.
"""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import load_benchmark

bench = load_benchmark("cuda_graph_decode")


def test_smoke_run_writes_every_row(tmp_path):
    record = bench.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "cuda_graph_decode_smoke.json").read_text())
    assert saved["complete"] and saved["rows"] == record["rows"]
    assert {"date", "command", "machine"} <= set(saved)
    assert {"torch", "transformers"} <= set(saved["machine"])
    assert [(r["config"], r["batch"]) for r in saved["rows"]] == [
        ("full", 1),
        ("full", 2),
        ("pyramidkv", 1),
        ("pyramidkv", 2),
    ]
    for row in saved["rows"]:
        assert row["eager_dynamic_ms"] > 0 and row["eager_static_ms"] > 0
        assert row["graph_ms"] is None and row["graph_equals_static"] is None  # no graph on a CPU
        assert row["static_equals_dynamic"] == 1.0, row
    full, pyramid = saved["rows"][0], saved["rows"][2]
    # static capacity: the prompt (full) or the widest kept row (pyramidkv) + max_new_tokens, 16-aligned
    assert set(full["capacity"]) == {144}  # 128 + 4 new tokens -> 144
    assert max(pyramid["capacity"]) < min(full["capacity"])


def test_smoke_run_of_the_caches_with_codes(tmp_path, monkeypatch):
    """FibQuant codes, every token and PyramidKV's: the static cache with codes (its fp16 ring holds all 4
    new tokens of the smoke run, as the dynamic cache's window does) gives the dynamic cache's tokens."""
    monkeypatch.setenv("PYRAMIDKV_CACHE_DIR", str(tmp_path / "codebooks"))
    configs = "fibquant,pyramidkv+fibquant"
    bench.main(["--smoke", "--out", str(tmp_path), "--configs", configs, "--label", "codes"])
    saved = json.loads((tmp_path / "cuda_graph_decode_codes_smoke.json").read_text())
    assert saved["complete"] and saved["settings"]["residual"] == 64
    assert [(r["config"], r["codec"], r["batch"]) for r in saved["rows"]] == [
        ("fibquant", "fibquant:2", 1),
        ("fibquant", "fibquant:2", 2),
        ("pyramidkv+fibquant", "fibquant:2", 1),
        ("pyramidkv+fibquant", "fibquant:2", 2),
    ]
    for row in saved["rows"]:
        assert row["eager_dynamic_ms"] > 0 and row["eager_static_ms"] > 0
        assert row["static_equals_dynamic"] == 1.0, row
    full, pyramid = saved["rows"][0], saved["rows"][2]
    # the store: the prompt (every token) or the widest kept row, + 1 slot, 16-aligned: 128 + 1 -> 144
    assert set(full["capacity"]) == {144}
    assert max(pyramid["capacity"]) < min(full["capacity"])
    assert pyramid["static_bytes"] < full["static_bytes"]


@pytest.mark.parametrize(
    "option,value",
    [
        ("--batches", "0,2"),
        ("--configs", "full,h2o"),
        ("--steps", "0"),
        ("--residual", "0"),
        ("--label", "a/b"),
    ],
)
def test_bad_options(option, value):
    with pytest.raises(SystemExit):
        bench.arguments(["--smoke", option, value])


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_random_weights_need_a_gpu(capsys):
    """``--random`` builds SmolLM2's shape on the GPU; on a CPU it is refused with the reason, not run."""
    with pytest.raises(SystemExit):
        bench.arguments(["--random"])
    assert "--random: needs a CUDA device" in capsys.readouterr().err
