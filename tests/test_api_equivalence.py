"""Every configuration of ``benchmarks/api_equivalence.py`` gives the greedy tokens and the held bytes recorded in
``benchmarks/results/api_equivalence_cpu.json`` (slow: the embedded model, 41 configurations).

The default run checks, on the left-padded batch of two prompts (every path the single prompt takes, and
the padding), a subset in which every policy, both budget forms and every codec appear; ``python
benchmarks/api_equivalence.py --out FILE`` recomputes all 82 runs (several minutes on two cores) for a
byte-for-byte comparison with the whole record.

The record was written by the same script on this repository's 2-core CPU (float32, torch's CPU build); it
is the behaviour the library must keep through restructurings. A change that alters what a configuration
keeps, how it stores it or how it attends shows up here as different tokens or bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import load_benchmark

RECORD = Path(__file__).parents[1] / "benchmarks" / "results" / "api_equivalence_cpu.json"


def _recorded(batch: int) -> list[dict]:
    return [row for row in json.loads(RECORD.read_text())["rows"] if row["batch"] == batch]


def test_the_record_covers_every_configuration_and_tells_them_apart():
    bench = load_benchmark("api_equivalence")
    for batch in (1, 2):
        rows = _recorded(batch)
        assert [(r["policy"], r["budget"], r["codec"]) for r in rows] == bench.configurations()
        assert all(len(tokens) == bench.NEW_TOKENS for r in rows for tokens in r["tokens"])
    # the check can fail: almost every configuration generates its own tokens
    assert len({json.dumps(r["tokens"]) for r in _recorded(1)}) > 30


# every policy, both budget forms and every codec at least once
CHECKED = [
    ("full", "128", "none"),
    ("pyramidkv", "128", "fibquant:2"),
    ("pyramidkv", "10%", "none"),
    ("snapkv", "128", "turboquant:3"),
    ("snapkv", "10%", "kivi:2"),
    ("h2o", "128", "uniform/fibquant:2"),
    ("h2o", "10%", "fibquant:2"),
    ("streamingllm", "10%", "kivi:2"),
]


@pytest.mark.slow
def test_tokens_and_bytes_equal_the_record(smollm2):
    batch = 2
    bench = load_benchmark("api_equivalence")
    model, tokenizer = smollm2
    got = bench.run(model, tokenizer, batch, CHECKED)
    recorded = {(r["policy"], r["budget"], r["codec"]): r for r in _recorded(batch)}
    want = [recorded[config] for config in CHECKED]
    assert len(got) == len(want)
    for new, old in zip(got, want, strict=True):
        name = f"{old['policy']} {old['budget']} {old['codec']} batch {batch}"
        assert new["prompt_tokens"] == old["prompt_tokens"], name
        assert new["nbytes"] == old["nbytes"], name
        assert new["tokens"] == old["tokens"], name
