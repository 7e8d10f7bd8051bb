"""``benchmarks/decode_host_ops.py``: the host work of a decode step, counted (not timed) on a tiny model.

Counts are exact and deterministic, so they can be held to bounds: the fused layer path must stay a handful
of torch operations per layer (its torch epilogue dispatched 93 per layer at commit 6f63c54, which at
~10 us each was most of a 58 ms step of the embedded model on the H200), and must launch the decode kernel
and the epilogue once each per layer.
"""

from __future__ import annotations

import json

import pytest

from .conftest import load_benchmark

bench = load_benchmark("decode_host_ops")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("host_ops") / "ops.json"
    record = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == record["rows"]
    return {row["cache"]: row for row in record["rows"]}


def test_fused_path_adds_a_handful_of_ops_and_two_launches_per_layer(rows):
    for label in ("fibquant:2, fused kernels", "pyramidkv 10% + fibquant:2, fused"):
        assert 0 < rows[label]["extra_ops_per_layer"] <= 12, rows[label]
        assert rows[label]["launches_per_layer"] == 2  # decode kernel + epilogue (one coded block)


def test_reference_and_eviction_paths_launch_nothing(rows):
    assert rows["full (DynamicCache)"]["extra_ops_per_layer"] == 0
    for label in ("full (DynamicCache)", "pyramidkv 10%", "fibquant:2, torch reference"):
        assert rows[label]["launches"] == 0
    # the torch reference decodes every block at every step: far more host work than the fused path
    reference = rows["fibquant:2, torch reference"]["extra_ops_per_layer"]
    assert reference > 5 * rows["fibquant:2, fused kernels"]["extra_ops_per_layer"]


def test_stubs_are_restored():
    from pyramidkv.kernels import encode, epilogue, triton_decode

    before = (
        triton_decode._decode_split_kernel,
        epilogue._epilogue_kernel,
        encode.fused_encode,
    )
    with bench.stubbed_launches():
        pass
    after = (
        triton_decode._decode_split_kernel,
        epilogue._epilogue_kernel,
        encode.fused_encode,
    )
    assert before == after
