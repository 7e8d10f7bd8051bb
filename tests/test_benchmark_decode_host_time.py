"""``benchmarks/decode_host_time.py --smoke``: the CPU run (tiny llama, Triton's interpreter; no timing claims).

What must hold on a CPU: one row per cache, timed on a layer that holds both of its blocks (the prompt's and the
flushed window's), with the medians of its repeats and their ratio; the JSON written as returned; bad options
refused.
"""

from __future__ import annotations

import json
import statistics

import pytest

from .conftest import load_benchmark

bench = load_benchmark("decode_host_time")


def test_smoke_run_times_the_call_and_the_calibration(tmp_path):
    record = bench.main(["--smoke", "--out", str(tmp_path), "--label", "tree"])
    saved = json.loads((tmp_path / "decode_host_time_tree_smoke.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert [row["cache"] for row in saved["rows"]] == list(bench.CACHES)
    for row in saved["rows"]:
        assert row["blocks"] == 2
        assert len(row["repeats_call_us"]) == len(row["repeats_add_us"]) == 2
        assert row["call_us"] == statistics.median(row["repeats_call_us"]) > 0
        assert row["add_us"] == statistics.median(row["repeats_add_us"]) > 0
        assert row["call_over_add"] == pytest.approx(row["call_us"] / row["add_us"])


def test_bad_options_are_refused():
    bad = (["--calls", "0"], ["--repeats", "0"], ["--warmup", "-1"], ["--layer", "-1"],
           ["--caches", "full"], ["--prompt", "0"])  # fmt: skip
    for argv in bad:
        with pytest.raises(SystemExit):
            bench.arguments(["--smoke", *argv])
