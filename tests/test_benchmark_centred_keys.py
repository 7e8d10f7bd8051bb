"""``benchmarks/centred_keys.py``: each configuration measured plain and centred from one capture.

The two caches of a configuration keep the same tokens, so their bytes differ by the key shifts alone (one
per layer and KV head, head dim values in the model's dtype), and the harness's own full cache measured
through the same path gives a KL of 0.
"""

from __future__ import annotations

import pytest
import torch

from pyramidkv.eval.perplexity import PerplexityTask

from .conftest import load_benchmark, make_tiny

bench = load_benchmark("centred_keys")


def test_plain_and_centred_share_everything_but_the_shifts():
    model = make_tiny("llama")
    task = PerplexityTask(context=48, continuation=8, chunk=4)
    configs = [bench.parse_config(c) for c in ("full/all/fibquant:2", "snapkv/16/turboquant:3")]
    generator = torch.Generator().manual_seed(0)
    records = []
    for _ in range(2):
        window = torch.randint(3, 97, (1, task.length), generator=generator)
        records += bench.measure_window(model, window, configs, task)
    assert [(r["config"], r["centred"]) for r in records[:4]] == [
        ("full/all/fibquant:2", False), ("full/all/fibquant:2", True),
        ("snapkv/16/turboquant:3", False), ("snapkv/16/turboquant:3", True),
    ]  # fmt: skip
    shifts = 4 * 2 * 16 * 4  # layers x KV heads x head dim x float32
    for plain, centred in zip(records[::2], records[1::2], strict=True):
        assert centred["bytes"] - plain["bytes"] == shifts
        assert plain["kl"] > 0 and centred["kl"] > 0
    rows = bench.summarize(records, configs)
    assert [row["samples"] for row in rows] == [2, 2]
    for row in rows:
        kl = [r["kl"] for r in records if r["config"] == row["config"]]
        assert row["kl_change"][0] == pytest.approx(((kl[1] - kl[0]) + (kl[3] - kl[2])) / 2)


def test_a_configuration_without_codes_is_refused():
    with pytest.raises(SystemExit, match="--configs: 'snapkv/10%/none' has no codec"):
        bench.parse_config("snapkv/10%/none")
