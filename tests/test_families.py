"""The model families people run, as tiny random-weight models: greedy tokens equal transformers' own cache at a
budget covering the prompt (alone and in a left-padded batch), compression at 10% that holds fewer bytes,
sliding-window layers that keep their window (Gemma 2 and 3, gpt-oss, Qwen2 with sliding layers), and codecs
where the family's attention allows them."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from pyramidkv import CompressedCache
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.sliding import SlidingLayer
from pyramidkv.errors import PyramidKVError

from .conftest import make_tiny

WINDOW = 8
FAMILIES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", dict(sliding_window=None)),
    "phi3": ("phi3", {}),
    "gemma2": ("gemma2", dict(sliding_window=WINDOW, query_pre_attn_scalar=16)),
    "gemma3": (
        "gemma3_text",
        dict(sliding_window=WINDOW, query_pre_attn_scalar=16, num_hidden_layers=6),
    ),
    "gpt-oss": ("gpt_oss", dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-sliding": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    ),
}
# families whose attention does more than a softmax of q.k: codes are refused
NO_CODES = {"gemma2", "gpt-oss"}


def _model(name: str):
    family, overrides = FAMILIES[name]
    model = make_tiny(family, **overrides)
    model.generation_config.eos_token_id = None
    return model


def _ids(batch: int = 1, length: int = 40) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(5))


def _greedy(model, cache, ids, mask=None, tokens: int = 10) -> torch.Tensor:
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False,
            **cache_kwargs(model, cache),
        )  # fmt: skip
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_exact_at_a_budget_covering_the_prompt(name):
    model = _model(name)
    expected = _greedy(model, DynamicCache(config=model.config), _ids())
    with CompressedCache(model, "snapkv", 10_000) as cache:
        assert torch.equal(_greedy(model, cache, _ids()), expected)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_padded_batch_is_exact_at_full_budget(name):
    model = _model(name)
    ids = _ids(2)
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    ids[1, :12] = 0
    expected = _greedy(model, DynamicCache(config=model.config), ids, mask)
    with CompressedCache(model, "pyramidkv", 10_000) as cache:
        assert torch.equal(_greedy(model, cache, ids, mask), expected)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_ten_percent_compresses_the_full_layers_and_keeps_the_windows(name):
    model = _model(name)
    full = DynamicCache(config=model.config)
    _greedy(model, full, _ids(), tokens=1)
    with CompressedCache(model, "snapkv", "10%") as cache:
        _greedy(model, cache, _ids(), tokens=1)
        kept = cache.kept_tokens()  # (layers, batch, kv_heads)
        for index, layer in enumerate(cache.layers):
            if isinstance(layer, SlidingLayer):
                assert int(kept[index].max()) == WINDOW - 1
            else:
                assert int(kept[index].max()) <= 8  # 10% of 40 prompt tokens, window 8 kept
        full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
        assert cache.nbytes() < full_bytes
        report = cache.memory_report()  # every layer kind reports its bytes
        assert report["total_bytes"] == cache.nbytes() and "own attention" in report["attention"]
        sliding = [isinstance(layer, SlidingLayer) for layer in cache.layers]
        assert any(sliding) == (name in {"gemma2", "gemma3", "gpt-oss", "qwen2-sliding"})


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_codes_where_the_attention_allows_them(name):
    model = _model(name)
    if name in NO_CODES:
        with pytest.raises(PyramidKVError, match=r"codec: .*(soft-caps|sinks)"):
            CompressedCache(model, "snapkv", "25%", codec="fibquant:3")
        return
    with CompressedCache(model, "snapkv", "25%", codec="fibquant:3") as cache:
        tokens = _greedy(model, cache, _ids())
        assert tokens.shape == (1, 10)
        assert any(getattr(layer, "coded", None) for layer in cache.layers)


@pytest.mark.parametrize("name", ["gemma3", "qwen2-sliding"])
@pytest.mark.parametrize("codec", [None, "fibquant:3"])
def test_a_byte_budget_counts_the_sliding_windows_as_held_whole(name, codec):
    """kv_memory beside sliding-window layers: their windows are held whole in the full cache and in the
    compressed one, and the compressed layers take what remains, so the cache holds at most the stated share of
    the full cache (transformers' own, windows included) and not much less."""
    from pyramidkv.cache.accounting import full_cache_nbytes

    model = _model(name)
    if name in NO_CODES and codec:
        return
    ids = _ids(length=120)
    full = full_cache_nbytes(model.config, ids.shape[1], 1, model.dtype)
    for share in (0.3, 0.6):
        with CompressedCache(model, "snapkv", kv_memory=f"{share:.0%}", codec=codec) as cache:
            _greedy(model, cache, ids, tokens=1)
            held = cache.nbytes() - sum(
                layer.keys.nbytes + layer.values.nbytes
                for layer in cache.layers
                if not isinstance(layer, SlidingLayer) and layer.keys is not None
            )  # the prompt's part: the one new token fed back is not in the budget
            assert held <= share * full, (share, held, full)
            kept = [
                int(tokens.max())
                for tokens, layer in zip(cache.kept_tokens(), cache.layers, strict=True)
                if not isinstance(layer, SlidingLayer)
            ]
            if min(kept) < ids.shape[1]:  # the budget binds: the compressed layers fill it
                assert 0.75 * share * full < held, (share, held, full)
    with (
        pytest.raises(PyramidKVError, match="sliding windows kept whole"),
        CompressedCache(model, "snapkv", kv_memory="1%") as cache,
    ):
        _greedy(model, cache, ids, tokens=1)
    if name in NO_CODES:
        return
    with CompressedCache(model, "snapkv", kv_memory="70%", plan="auto") as cache:  # the planner too
        _greedy(model, cache, ids, tokens=1)
        prompt = cache.memory_report()["prompt_bytes"]
        assert prompt <= 0.7 * full, (prompt, full)
        rates = {
            r["bits"] for layer in cache.memory_report()["rates"] for r in layer if r["tokens"]
        }
        assert None in rates and len(rates) >= 2  # the windows whole, the global layers' codes


@pytest.mark.parametrize("name", ["gemma3", "qwen2-sliding"])
def test_the_evaluations_capture_rebuilds_a_sliding_models_cache(name):
    """One captured prefill rebuilds, per configuration, the cache a fresh prefill would hold: windows of the
    sliding layers included, so the next token's logits agree."""
    from pyramidkv.eval.prefill import prefill

    model = _model(name)
    ids = _ids()
    step = torch.tensor([[7]])
    captured = prefill(model, ids)
    with torch.inference_mode(), captured.cache("snapkv", "25%") as rebuilt:
        rebuilt_logits = model(step, **cache_kwargs(model, rebuilt)).logits
        rebuilt_kept = rebuilt.kept_tokens()
    with torch.inference_mode(), CompressedCache(model, "snapkv", "25%") as fresh:
        model(ids, **cache_kwargs(model, fresh))
        fresh_logits = model(step, **cache_kwargs(model, fresh)).logits
        assert torch.equal(fresh.kept_tokens(), rebuilt_kept)
    torch.testing.assert_close(rebuilt_logits, fresh_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["gemma3", "qwen2-sliding"])
@pytest.mark.parametrize("codec", [None, "fibquant:3"])
def test_the_static_cache_holds_sliding_windows_as_rings(name, codec):
    """The CUDA-graph path's static cache of a mixed model: sliding layers as rings of the window, full layers as
    static buffers (or codes); its logits equal the eager cache's step by step, teacher-forced, well past the
    point where every ring has wrapped (on the CPU the captured step runs eagerly)."""
    from pyramidkv.static.cache import StaticCompressedCache
    from pyramidkv.static.sliding import StaticSlidingLayer

    model, steps = _model(name), 3 * WINDOW
    # codes: a residual window longer than the decode, so both caches hold every new token in fp16 (the static
    # store codes one token per step where the eager cache flushes a block: tests/test_static_codes.py)
    options = dict(codec=codec, residual=64) if codec else {}
    eager = CompressedCache(model, "snapkv", "25%", **options)
    source = CompressedCache(model, "snapkv", "25%", **options)
    with torch.inference_mode():
        token = model(_ids(), **cache_kwargs(model, eager)).logits[:, -1:].argmax(-1)
        model(_ids(), **cache_kwargs(model, source))
        static = StaticCompressedCache(model, source, max_new_tokens=steps)
        assert any(isinstance(layer, StaticSlidingLayer) for layer in static.layers)
        for step in range(steps):
            want = model(token, **cache_kwargs(model, eager)).logits[:, -1]
            got = model(token, **cache_kwargs(model, static)).logits[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"step {step}")
            token = want.argmax(-1, keepdim=True)
        static.rewind(0)  # the rings wrapped: rewind(0) restores the windows as built
        again = model(_ids()[:, -1:] * 0 + token, **cache_kwargs(model, static)).logits[:, -1]
        assert torch.isfinite(again).all()
    for cache in (eager, source, static):
        cache.close()


def test_the_static_cache_refuses_what_its_sliding_windows_cannot_do():
    from pyramidkv.static.cache import StaticCompressedCache

    gemma2 = _model("gemma2")
    with CompressedCache(gemma2, "snapkv", "25%") as source:
        _greedy(gemma2, source, _ids(), tokens=1)
        with pytest.raises(PyramidKVError, match="soft-caps its attention logits"):
            StaticCompressedCache(gemma2, source, max_new_tokens=4)
    gemma3 = _model("gemma3")
    with CompressedCache(gemma3, "snapkv", "25%") as source:
        _greedy(gemma3, source, _ids(batch=2), tokens=1)
        with pytest.raises(PyramidKVError, match="several rows"):
            StaticCompressedCache(gemma3, source, max_new_tokens=4)
