"""``benchmarks/generate_throughput.py``: a batch built by repeating prefilled rows is the batch prefilled whole.

The reference for `batch_select_indices` (rows repeated) is the obvious one: prefill the repeated prompts in one forward and
decode both caches with the same tokens; logits and held bytes must agree, for every cache the benchmark
sweeps, across flushes of the recent window into new coded blocks.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from pyramidkv.cache.accounting import cache_nbytes
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache

from .conftest import load_benchmark, make_tiny

bench = load_benchmark("generate_throughput")

CACHES = {
    "full": lambda m: DynamicCache(config=m.config),
    "pyramidkv": lambda m: CompressedCache(m, "pyramidkv", 24, kernel="torch"),
    "fibquant": lambda m: CompressedCache(
        m, "full", codec="fibquant:2", residual=2, kernel="torch"
    ),
    "pyramidkv+fibquant": lambda m: CompressedCache(
        m, "pyramidkv", 24, codec="fibquant:2", residual=2, kernel="torch"
    ),
}


def _decode(
    model, cache, ids: torch.Tensor, forced: torch.Tensor, index=None
) -> list[torch.Tensor]:
    """Prefill ``ids`` (rows repeated by ``index`` afterwards when given), then feed ``forced`` tokens."""
    with torch.inference_mode():
        logits = [model(input_ids=ids, **cache_kwargs(model, cache)).logits[:, -1]]
        if index is not None:
            cache.batch_select_indices(index)
            logits = [logits[0][index]]
        for step in range(forced.shape[1]):
            out = model(input_ids=forced[:, step : step + 1], **cache_kwargs(model, cache))
            logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("name", list(CACHES))
def test_repeated_rows_decode_like_the_batch_prefilled_whole(name):
    model = make_tiny("llama")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, 96), generator=generator)
    index = torch.tensor([1, 0, 1, 1])
    forced = torch.randint(3, 97, (4, 5), generator=generator)  # 5 steps: the window flushes twice

    tiled, whole = CACHES[name](model), CACHES[name](model)
    got = _decode(model, tiled, ids, forced, index)
    want = _decode(model, whole, ids[index], forced)

    assert cache_nbytes(tiled) == cache_nbytes(whole)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")
    for cache in (tiled, whole):
        if isinstance(cache, CompressedCache):
            cache.close()


def test_repeated_rows_of_a_planned_cache_decode_as_the_rows_prefilled():
    """The planner plans a batch's rows together, so four rows prefilled are not two rows repeated; what the
    benchmark's "plan" cache must give is each repeated row decoding as it would in the prefilled rows."""
    model = make_tiny("llama")
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 97, (2, 96), generator=generator)
    index = torch.tensor([1, 0, 1, 1])
    forced = torch.randint(3, 97, (4, 5), generator=generator)

    def planned():
        spec = bench.specs("10%", "fibquant:2", "20%")["plan"]
        return spec.build(model, kernel="torch")

    tiled, rows = planned(), planned()
    got = _decode(model, tiled, ids, forced, index)
    want = _decode(model, rows, ids[index[:2]], forced[:2])
    assert all(type(layer).__name__ == "PlannedLayer" for layer in rows.layers)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a[:2], b, atol=1e-4, rtol=1e-4, msg=f"step {step}")
    tiled.close()
    rows.close()


@pytest.mark.parametrize("memory,per_row,shared", [(1000, 7.0, 0), (1000, 7.5, 13), (10, 11.0, 0)])
def test_largest_batch_is_the_most_rows_that_fit(memory, per_row, shared):
    brute = 0
    while shared + (brute + 1) * per_row <= memory:
        brute += 1
    assert bench.largest_batch(memory, per_row, shared) == brute


def test_prefill_out_of_memory_halves_the_rows_per_forward(monkeypatch):
    tried = []

    def fake_measure(model, prompts, spec, batch, *, prefill_rows, **_):
        tried.append(prefill_rows)
        if min(batch, prefill_rows) > 3:
            raise bench.PrefillOutOfMemory("too big")
        return {"config": spec.key, "batch": batch, "prefill_rows": min(batch, prefill_rows)}

    monkeypatch.setattr(bench, "measure", fake_measure)
    settings = {"prefill_rows": 32, "kernel": "torch", "steps": 1, "warmup": 0}
    model = SimpleNamespace(device=torch.device("cpu"))
    row = bench.attempt(model, None, bench.specs("", "")["full"], 20, settings)
    assert tried == [32, 10, 5, 2]  # min(20, 32) = 20 halves to 10, 5, 2
    assert row["prefill_rows"] == 2 and settings["prefill_rows"] == 2
