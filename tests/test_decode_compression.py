"""Generation under a decode budget (``CompressedCache(decode_budget=, compress_every=)``): exact when the budget
holds everything, memory bounded by each layer's share plus ``compress_every`` tokens, and a SnapKV
recompression that keeps what a slow, obvious torch reference keeps from the same tokens and queries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyramidkv import CompressedCache
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.layers import CompressedLayer
from pyramidkv.errors import PyramidKVError
from pyramidkv.static.cache import StaticCompressedCache

from .conftest import make_tiny


def _decode(model, cache, ids: torch.Tensor, steps: int, reference=None):
    """Greedy tokens of ``steps`` decode steps after prefilling ``ids``; with ``reference`` (another cache),
    teacher-forced by the reference's greedy tokens. Returns the tokens and each step's most slots held."""
    tokens, held = [], []
    with torch.inference_mode():
        logits = model(ids, **cache_kwargs(model, cache)).logits[:, -1:]
        if reference is not None:
            logits = model(ids, **cache_kwargs(model, reference)).logits[:, -1:]
        token = logits.argmax(-1)
        for _ in range(steps):
            logits = model(token, **cache_kwargs(model, cache)).logits[:, -1:]
            if reference is not None:
                logits = model(token, **cache_kwargs(model, reference)).logits[:, -1:]
            token = logits.argmax(-1)
            tokens.append(token)
            held.append([layer.slots() for layer in cache.layers])
    return torch.cat(tokens, dim=1), held


def _prompt(batch: int = 1, length: int = 120) -> torch.Tensor:
    vocab = make_tiny("llama").config.vocab_size
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("codec", [None, "fibquant:3"])
def test_a_budget_that_holds_everything_changes_nothing(codec):
    model = make_tiny("llama")
    plain = CompressedCache(model, "snapkv", 64, codec=codec)
    bounded = CompressedCache(
        model, "snapkv", 64, codec=codec, decode_budget=10_000, compress_every=8
    )
    expected, _ = _decode(model, plain, _prompt(), 40)
    found, _ = _decode(model, bounded, _prompt(), 40)
    assert torch.equal(found, expected)


def test_nothing_is_evicted_before_the_budget_is_reached():
    """Intervals that end without a compression still count their tokens as seen: a layer holds every token
    until the tokens seen pass its share."""
    model = make_tiny("llama")
    cache = CompressedCache(model, "snapkv", 400, decode_budget=400, compress_every=16)
    _, held = _decode(model, cache, _prompt(), 120)
    for step, slots in enumerate(held):
        assert slots == [_prompt().shape[1] + step + 1] * len(slots), step


@pytest.mark.parametrize(
    "options",
    [
        dict(policy="snapkv", budget=64),
        dict(policy="pyramidkv", budget=64),
        dict(policy="h2o", budget=64),
        dict(policy="streamingllm", budget=64),
        dict(policy="snapkv", budget=64, codec="fibquant:3", residual=16),
    ],
    ids=lambda o: "-".join(map(str, o.values())),
)
def test_memory_stays_within_the_share_plus_one_interval(options):
    model = make_tiny("llama")
    every, decode_budget = 16, 40
    cache = CompressedCache(model, decode_budget=decode_budget, compress_every=every, **options)
    steps = 150
    _, held = _decode(model, cache, _prompt(2), steps)
    seen = _prompt().shape[1] + steps
    shares = cache.layers[0].decoding.selection.layer_budgets(seen, 2)
    for step, slots in enumerate(held):
        if step >= 2 * every:
            for layer, (found, share) in enumerate(zip(slots, shares, strict=True)):
                assert found <= share + every, (step, layer, found, share)
    # and it did evict: far fewer than every token seen
    assert max(held[-1]) < seen // 2


def _reference_snapkv(queries, keys, scaling: float, keep: int, window: int, kernel: int = 7):
    """Positions SnapKV keeps of ``keys`` (kv_heads, n, d) scored by ``queries`` (q_heads, w, d) sitting on the
    last w positions: float64 softmax per query head, summed over the window, the window zeroed, max-pooled,
    averaged per GQA group; the last ``window`` positions always, then the best scores."""
    kv_heads, n, _ = keys.shape
    q_heads, w, _ = queries.shape
    groups = q_heads // kv_heads
    kept = []
    for head in range(kv_heads):
        total = torch.zeros(n, dtype=torch.float64)
        for g in range(groups):
            q = queries[head * groups + g].double()
            logits = q @ keys[head].double().T * scaling  # (w, n)
            for i in range(w):
                logits[i, n - w + i + 1 :] = float("-inf")
            summed = torch.softmax(logits, dim=-1).sum(dim=0)
            summed[n - w :] = 0
            pooled = F.max_pool1d(summed[None, None], kernel, stride=1, padding=kernel // 2)[0, 0]
            total += pooled / groups
        last = set(range(n - min(window, keep), n))
        others = [p for p in torch.argsort(total, descending=True).tolist() if p not in last]
        kept.append(sorted(last | set(others[: keep - len(last)])))
    return kept


def test_a_recompression_keeps_what_the_reference_keeps(monkeypatch):
    model = make_tiny("llama")
    every, decode_budget = 16, 40
    cache = CompressedCache(model, "snapkv", 64, decode_budget=decode_budget, compress_every=every)
    seen = {}
    reselect = CompressedLayer._reselect

    def spying(self, queries, recent, scaling, seen_rows, selection):
        if self.layer_idx == 1 and "keys" not in seen:
            keys, _, held = self.held()
            seen.update(queries=queries.clone(), scaling=scaling, held=held.clone(),
                        keys=torch.cat([keys, self.keys], dim=-2).clone(), rows=list(seen_rows))  # fmt: skip
            result = reselect(self, queries, recent, scaling, seen_rows, selection)
            seen["kept"] = self.kept_keys.clone()
            seen["lengths"] = self.lengths.clone()
            seen["share"] = selection.layer_budgets(seen_rows[0], 1)[1]
            return result
        return reselect(self, queries, recent, scaling, seen_rows, selection)

    monkeypatch.setattr(CompressedLayer, "_reselect", spying)
    _decode(model, cache, _prompt(), 3 * every)
    assert "kept" in seen and bool(seen["held"].all())
    window = cache.policy.window
    expected = _reference_snapkv(
        seen["queries"][0, :, -window:], seen["keys"][0], seen["scaling"], seen["share"], window
    )
    for head, positions in enumerate(expected):
        assert int(seen["lengths"][0, head]) == len(positions)
        torch.testing.assert_close(
            seen["kept"][0, head, : len(positions)],
            seen["keys"][0, head, positions],
            rtol=0,
            atol=0,
        )


def test_decode_budget_is_checked():
    model = make_tiny("llama")
    with pytest.raises(PyramidKVError, match="compress_every"):
        CompressedCache(model, "snapkv", 64, decode_budget=64, compress_every=0)
    with pytest.raises(PyramidKVError, match="decode_budget: policy 'adakv'"):
        CompressedCache(model, "adakv", 64, decode_budget=64)
    with pytest.raises(PyramidKVError, match="decode_budget: not with plan"):
        CompressedCache(model, "snapkv", kv_memory="20%", plan="auto", decode_budget=64)
    with pytest.raises(PyramidKVError, match="decode_budget: the full policy"):
        CompressedCache(model, "full", decode_budget=64)
    with pytest.raises(PyramidKVError, match="budget"):
        CompressedCache(model, "snapkv", 64, decode_budget="-3")


@pytest.mark.parametrize(
    "options",
    [
        dict(policy="snapkv", budget=48, decode_budget=40, compress_every=16),
        dict(policy="pyramidkv", budget=48, decode_budget=40, compress_every=8),
        dict(policy="h2o", budget=48, decode_budget=40, compress_every=16),
        dict(policy="streamingllm", budget=48, decode_budget=40, compress_every=16),
        dict(policy="snapkv", budget=400, decode_budget=400, compress_every=16),  # nothing evicted
        # codes: the store holds the survivors' own codes, the ring the interval's tokens
        dict(policy="snapkv", budget=48, decode_budget=40, compress_every=16, codec="fibquant:3"),
        dict(policy="h2o", budget=48, decode_budget=40, compress_every=16, codec="turboquant:2"),
        dict(
            policy="pyramidkv",
            budget=48,
            decode_budget=40,
            compress_every=8,
            codec="fibquant:2",
            residual=8,
        ),
        dict(policy="snapkv", budget=400, decode_budget=400, compress_every=16, codec="fibquant:3"),
    ],
    ids=lambda o: "-".join(map(str, o.values())),
)
def test_the_static_cache_selects_again_as_the_eager_cache_does(options):
    """The graph path's static layers under a decode budget (selected again in place between steps) give the
    eager cache's logits, teacher-forced by its greedy tokens, in fixed memory, over several intervals."""
    model = make_tiny("llama")
    ids, steps = _prompt(batch=2), 70
    eager = CompressedCache(model, **options)
    source = CompressedCache(model, **options)
    with torch.inference_mode():
        first = model(ids, **cache_kwargs(model, eager)).logits[:, -1:]
        model(ids, **cache_kwargs(model, source))
        static = StaticCompressedCache(model, source, max_new_tokens=steps)
        token, nbytes = first.argmax(-1), None
        for step in range(steps):
            want = model(token, **cache_kwargs(model, eager)).logits[:, -1]
            got = model(token, **cache_kwargs(model, static)).logits[:, -1]
            static.after_step()
            nbytes = nbytes or static.nbytes()  # after the first step allocated the query ring
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"step {step}")
            token = want.argmax(-1, keepdim=True)
        held = [layer.slots() for layer in eager.layers]
    assert static.nbytes() == nbytes  # fixed buffers, whatever the length
    every = options["compress_every"]
    for slots, layer in zip(
        held, static.layers, strict=True
    ):  # the eager share fits the static width
        assert slots <= layer.width + every
    assert static.layers[0].capacity < ids.shape[1] + steps or options["decode_budget"] >= 400
    for cache in (eager, source, static):
        cache.close()


def test_the_graph_path_takes_codes_when_every_interval_fits_the_window():
    model = make_tiny("llama")
    cache = CompressedCache(
        model, "snapkv", 64, codec="fibquant:3", decode_budget=64, compress_every=32, residual=16
    )
    with torch.inference_mode():
        model(_prompt(), **cache_kwargs(model, cache))
    with pytest.raises(PyramidKVError, match="compress_every: got 32 with a window of 16 tokens"):
        StaticCompressedCache(model, cache, max_new_tokens=8)
    cache.close()


def test_the_static_cache_with_codes_selects_again_through_the_kernels():
    """The same over the fused path (the decode, encode and ring kernels; Triton's interpreter on a CPU), the
    eager cache on the same kernels: after each compaction the ring's slot counters, rewritten in place, place
    the next tokens where the commit kernel writes them (a compaction at step 8 of a ring of 16 moves the next
    slot off step mod 16)."""
    import os

    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "the kernels run on CPU tensors in Triton's interpreter only (TRITON_INTERPRET=1)"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_tiny("llama").to(device)
    options = dict(
        policy="snapkv",
        budget=24,
        decode_budget=20,
        compress_every=8,
        codec="fibquant:2",
        residual=16,
    )
    ids, steps = _prompt(length=32).to(device), 18
    eager = CompressedCache(model, kernel="triton", **options)
    source = CompressedCache(model, kernel="triton", **options)
    with torch.inference_mode():
        first = model(ids, **cache_kwargs(model, eager)).logits[:, -1:]
        model(ids, **cache_kwargs(model, source))
        static = StaticCompressedCache(model, source, max_new_tokens=steps, kernel="triton")
        assert all(layer.fused for layer in static.layers)
        token = first.argmax(-1)
        for step in range(steps):
            want = model(token, **cache_kwargs(model, eager)).logits[:, -1]
            got = model(token, **cache_kwargs(model, static)).logits[:, -1]
            static.after_step()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {step}")
            token = want.argmax(-1, keepdim=True)
    assert all(layer.compacted for layer in static.layers)
    for cache in (eager, source, static):
        cache.close()
