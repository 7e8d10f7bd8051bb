"""``benchmarks/graph_step_profile.py --smoke``: the CPU run (eager steps, aten operations for kernels).

What must hold on a CPU: a row per cache with its operations per step and the costliest of them, the JSON
written as returned, bad options refused. (Graph replays and device kernels need the GPU.)
"""

from __future__ import annotations

import json

import pytest

from .conftest import load_benchmark

bench = load_benchmark("graph_step_profile")


def test_smoke_run_profiles_every_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRAMIDKV_CACHE_DIR", str(tmp_path / "codebooks"))
    configs = "full,pyramidkv+fibquant"
    record = bench.main(["--smoke", "--out", str(tmp_path), "--configs", configs, "--replays", "2"])
    saved = json.loads((tmp_path / "graph_step_profile_smoke.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert [row["config"] for row in saved["rows"]] == ["full", "pyramidkv+fibquant"]
    for row in saved["rows"]:
        top = row["top"]
        assert len(top) == 12 and all(k["name"].startswith("aten::") for k in top)
        assert row["kernels_per_step"] >= sum(k["per_step"] for k in top) > 0
        assert row["kernel_ms_per_step"] * 1e3 >= top[0]["per_step"] * top[0]["us_each"] * 0.999
    full, coded = saved["rows"]
    # on a CPU the codes are decoded by the torch reference every step: more operations than the full cache
    assert coded["kernels_per_step"] > full["kernels_per_step"]


def test_bad_options_are_refused():
    with pytest.raises(SystemExit):
        bench.arguments(["--configs", "full,nonsense"])
    with pytest.raises(SystemExit):
        bench.arguments(["--replays", "0"])
