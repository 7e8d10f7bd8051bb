"""``benchmarks/eager_step_time.py --smoke``: the CPU run (tiny random llama; no timing claims).

What must hold on a CPU: one row per cache and context (by default full and pyramidkv, with and without the
outer backend context) with a time per round and their median, the JSON written as returned, bad options
refused.
"""

from __future__ import annotations

import json
import statistics

import pytest

from .conftest import load_benchmark

bench = load_benchmark("eager_step_time")


def test_smoke_run_times_every_row_in_alternating_rounds(tmp_path):
    record = bench.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "eager_step_time_smoke.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert [(r["cache"], r["wrapped"]) for r in saved["rows"]] == [
        ("full", True), ("full", False), ("pyramidkv", True), ("pyramidkv", False)
    ]  # fmt: skip
    for row in saved["rows"]:
        assert len(row["rounds_ms"]) == 2 and min(row["rounds_ms"]) > 0
        assert row["ms_per_step"] == statistics.median(row["rounds_ms"])


def test_caches_with_codes_and_one_context(tmp_path):
    """FibQuant rows (the torch reference on a CPU) in the wrapped context only."""
    argv = ["--smoke", "--out", str(tmp_path), "--caches", "full,pyramidkv+fibquant"]
    record = bench.main([*argv, "--contexts", "wrapped"])
    assert [(r["cache"], r["wrapped"]) for r in record["rows"]] == [
        ("full", True), ("pyramidkv+fibquant", True)
    ]  # fmt: skip
    assert all(len(r["rounds_ms"]) == 2 for r in record["rows"])


def test_bad_options_are_refused():
    bad = (["--steps", "0"], ["--rounds", "0"], ["--warmup", "-1"], ["--prompt", "0"],
           ["--caches", "full,kivi"], ["--contexts", "outer"], ["--caches", ""])  # fmt: skip
    for argv in bad:
        with pytest.raises(SystemExit):
            bench.arguments(argv)
