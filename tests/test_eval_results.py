"""Results on disk: JSON lines that survive a kill, resume bookkeeping, and the summary's statistics."""

from __future__ import annotations

import json

import pytest
from scipy.stats import binomtest

from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.results import (
    RESULTS,
    ResultsWriter,
    done_pairs,
    read_records,
    summarize,
    wilson,
)


def record(sample: str, config: str, score: float = 1.0, **extra) -> dict:
    policy, budget, codec = config.split("/")
    return {
        "sample": sample,
        "task": "needle",
        "mode": "query-aware",
        "policy": policy,
        "budget": budget,
        "codec": codec,
        "config": config,
        "length": 1000,
        "depth": None,
        "score": score,
        "correct": score == 1.0,
        "kv_bytes": 10,
        "full_kv_bytes": 100,
        "kept_tokens": 64.0,
        "prompt_tokens": 990,
        "prefill_s": 0.5,
        "cache_s": 0.01,
        "decode_s": 0.1,
        **extra,
    }


def test_every_line_is_on_disk_as_soon_as_it_is_written(tmp_path):
    with ResultsWriter(tmp_path) as writer:
        writer.write(record("a", "full/all/none"))
        lines = (tmp_path / RESULTS).read_text().splitlines()  # read while the writer is still open
        assert [json.loads(line)["sample"] for line in lines] == ["a"]


def test_a_killed_run_leaves_valid_lines_and_resume_goes_on(tmp_path):
    with ResultsWriter(tmp_path) as writer:
        for name in ("a", "b", "c"):
            writer.write(record(name, "snapkv/64/none"))
    path = tmp_path / RESULTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 25])  # killed while writing the third line
    assert [r["sample"] for r in read_records(tmp_path)] == ["a", "b"]
    assert done_pairs(read_records(tmp_path)) == {("a", "snapkv/64/none"), ("b", "snapkv/64/none")}
    with ResultsWriter(tmp_path, resume=True) as writer:
        writer.write(record("c", "snapkv/64/none"))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["sample"] for line in lines] == ["a", "b", "c"]


def test_existing_results_need_resume(tmp_path):
    with ResultsWriter(tmp_path) as writer:
        writer.write(record("a", "full/all/none"))
    with pytest.raises(PyramidKVError, match=r"--out.*--resume"):
        ResultsWriter(tmp_path)


def test_a_corrupt_complete_line_is_reported_with_its_number(tmp_path):
    (tmp_path / RESULTS).write_text(json.dumps(record("a", "full/all/none")) + "\n{oops\n")
    with pytest.raises(PyramidKVError, match="line 2"):
        read_records(tmp_path)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (8, 10), (19, 20), (20, 20), (37, 40), (1, 3)])
def test_wilson_interval_matches_scipy(k, n):
    reference = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson(k, n)
    assert low == pytest.approx(reference.low, abs=1e-9)
    assert high == pytest.approx(reference.high, abs=1e-9)


def test_summary_counts_per_config_length_and_depth():
    records = [
        record("s1", "full/all/none", 1.0, depth=0.0),
        record("s2", "full/all/none", 1.0, depth=0.5),
        record("s1", "snapkv/64/none", 0.0, depth=0.0),
        record("s2", "snapkv/64/none", 1.0, depth=0.5),
        record("s3", "snapkv/64/none", 0.5, depth=0.5, length=2000),
    ]
    rows = summarize(records)
    main = {(r["config"], r["length"]): r for r in rows if r["depth"] is None}
    assert (
        main[("full/all/none", 1000)]["n"] == 2 and main[("full/all/none", 1000)]["accuracy"] == 1
    )
    snap = main[("snapkv/64/none", 1000)]
    assert (snap["n"], snap["correct"], snap["accuracy"]) == (2, 1, 0.5)
    assert snap["ci95"] == pytest.approx(list(wilson(1, 2)), abs=1e-4)
    assert main[("snapkv/64/none", 2000)]["accuracy"] == 0.5
    deep = {(r["config"], r["length"], r["depth"]): r["n"] for r in rows if r["depth"] is not None}
    assert deep == {
        ("full/all/none", 1000, 0.0): 1,
        ("full/all/none", 1000, 0.5): 1,
        ("snapkv/64/none", 1000, 0.0): 1,
        ("snapkv/64/none", 1000, 0.5): 1,
        ("snapkv/64/none", 2000, 0.5): 1,
    }
