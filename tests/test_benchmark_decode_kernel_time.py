"""benchmarks/decode_kernel_time.py: it reads device kernel times from the CUDA profiler, so without a GPU it
must refuse with a clear message instead of printing numbers; on a GPU it profiles one small case."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import load_benchmark

bench = load_benchmark("decode_kernel_time")


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
@pytest.mark.parametrize("script", ["decode_kernel_time", "decode_split_time"])
def test_refuses_without_a_gpu(tmp_path, script):
    """Both profiler benchmarks refuse without CUDA, and write nothing."""
    out = tmp_path / "times.json"
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        load_benchmark(script).main(["--out", str(out)])
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("triton", [False, True])
def test_profiles_a_small_case(tmp_path, triton):
    out = tmp_path / "times.json"
    args = ["--heads", "4/2x64", "--batch", "1", "--context", "300", "--bits", "2"]
    args += ["--codec", "fibquant,turboquant", "--out", str(out)] + ["--triton"] * triton
    record = bench.main(args)
    assert [row["codec"] for row in record["rows"]] == ["fibquant", "turboquant"]
    for row in record["rows"]:
        assert row["decode_kernel_ms"] > 0 and row["all_kernels_ms"] >= row["decode_kernel_ms"]
        # the CUDA kernel is the one of cuda_decode.KERNEL_NAME; the Triton kernel has its own name
        assert ("fibquant_mma_decode" in row["decode_kernel"]) != triton
    assert json.loads(out.read_text())["rows"][0]["bits"] == 2
