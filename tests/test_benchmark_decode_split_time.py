"""benchmarks/decode_split_time.py: on a GPU it times every split of one small case and marks the default and the
least (its refusal without a GPU is tested with decode_kernel_time's)."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import load_benchmark

bench = load_benchmark("decode_split_time")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_times_each_split_and_marks_default_and_least(tmp_path):
    out = tmp_path / "splits.json"
    record = bench.main(
        [
            "--heads",
            "4/2x64",
            "--context",
            "2k",
            "--splits",
            "1,2,4",
            "--reps",
            "3",
            "--out",
            str(out),
        ]
    )
    rows = record["rows"]
    assert [r["split"] for r in rows] == sorted({r["split"] for r in rows})
    assert sum(r["default"] for r in rows) == 1 and sum(r["least"] for r in rows) == 1
    least = next(r for r in rows if r["least"])
    assert least["all_us"] == min(r["all_us"] for r in rows)
    assert all(r["all_us"] >= r["kernel_us"] + r["epilogue_us"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
