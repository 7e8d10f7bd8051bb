"""Compressing every layer at the end of the prefill forward (``compress_after="forward"``, :mod:`pyramidkv.cache.
batched`) keeps exactly what compressing each layer after its attention keeps: the same tokens per row, the same
keys and values, the same bytes and the same next-token logits, for every policy that batches, with padding,
codecs and byte budgets, and when the layers are scored in groups."""

from __future__ import annotations

import pytest
import torch

from pyramidkv import CompressedCache
from pyramidkv.cache import batched
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.errors import PyramidKVError

from .conftest import make_tiny

OPTIONS = [
    dict(policy="snapkv", budget=64),
    dict(policy="pyramidkv", budget="10%"),
    dict(policy="streamingllm", budget=64),
    dict(policy="random", budget=64, seed=3),
    dict(policy="pyramidkv-adaptive", budget=64),
    dict(policy="adakv", budget=64),
    dict(policy="snapkv", budget=64, codec="fibquant:3"),
    dict(policy="snapkv", kv_memory="20%"),
    dict(policy="pyramidkv", budget=1000),  # more than the prompt: kept whole
]


def _prefill_and_step(model, options: dict, after: str):
    ids = torch.randint(
        3, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1)
    )
    mask = torch.ones_like(ids)
    mask[1, :50] = 0
    cache = CompressedCache(model, compress_after=after, **options)
    with torch.inference_mode():
        model(ids, attention_mask=mask, **cache_kwargs(model, cache))
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        logits = model(ids[:, -1:], attention_mask=step_mask, **cache_kwargs(model, cache)).logits
    return cache, logits


def _kept(layer) -> list[torch.Tensor]:
    """Each row's kept keys and values, up to its length (codes decoded)."""
    keys, values, held = layer.held()
    found = []
    for row in range(keys.shape[0]):
        for head in range(keys.shape[1]):
            visible = held[row].clone()
            if layer.lengths is not None and not hasattr(layer, "coded"):
                visible[int(layer.lengths[row, head]) :] = False
            found += [keys[row, head][visible], values[row, head][visible]]
    return found


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_forward_keeps_what_layer_by_layer_keeps(options):
    model = make_tiny("llama")
    batched_cache, batched_logits = _prefill_and_step(model, options, "forward")
    layered_cache, layered_logits = _prefill_and_step(model, options, "layer")
    assert batched_cache.compress_after == "forward" and layered_cache.compress_after == "layer"
    assert torch.equal(batched_cache.kept_tokens(), layered_cache.kept_tokens())
    assert batched_cache.nbytes() == layered_cache.nbytes()
    for ours, theirs in zip(batched_cache.layers, layered_cache.layers, strict=True):
        assert ours.ragged == theirs.ragged
        assert ours.prompt_bytes == theirs.prompt_bytes
        for a, b in zip(_kept(ours), _kept(theirs), strict=True):
            assert torch.equal(a, b)
    torch.testing.assert_close(batched_logits, layered_logits, rtol=0, atol=1e-5)
    batched_cache.close()
    layered_cache.close()


def test_groups_of_layers_choose_the_same(monkeypatch):
    """Scored two layers at a time (a small group limit), the choice is the one-group choice."""
    model = make_tiny("llama")
    whole, _ = _prefill_and_step(model, dict(policy="pyramidkv", budget=64), "forward")
    monkeypatch.setattr(batched, "GROUP_BYTES", 1)
    grouped, _ = _prefill_and_step(model, dict(policy="pyramidkv", budget=64), "forward")
    for ours, theirs in zip(grouped.layers, whole.layers, strict=True):
        assert torch.equal(ours.kept_keys, theirs.kept_keys)
        assert torch.equal(ours.lengths, theirs.lengths)
    whole.close()
    grouped.close()


def test_each_layer_holds_only_its_own_tokens():
    """The layers' kept tokens share one allocation, each a contiguous part of the size it keeps: the pyramid's
    layers hold their own budgets, not the largest one."""
    model = make_tiny("llama")
    cache, _ = _prefill_and_step(model, dict(policy="pyramidkv", budget=64), "forward")
    widths = [layer.kept_keys.shape[-2] for layer in cache.layers]
    assert len(set(widths)) > 1
    storage = cache.layers[0].kept_keys.untyped_storage()
    for layer in cache.layers:
        assert layer.kept_keys.is_contiguous()
        assert layer.kept_keys.untyped_storage().data_ptr() == storage.data_ptr()
    assert storage.nbytes() == sum(layer.kept_keys.nbytes for layer in cache.layers)
    cache.close()


def test_the_buffer_is_released():
    model = make_tiny("llama")
    cache, _ = _prefill_and_step(model, dict(policy="snapkv", budget=64), "forward")
    assert (
        cache.layers[0].batched_prefill.buffer is None
        and cache.layers[0].batched_prefill.queries is None
    )
    cache.close()


def test_compress_after_is_checked():
    model = make_tiny("llama")
    with pytest.raises(PyramidKVError, match="compress_after: got 'end'; expected 'auto'"):
        CompressedCache(model, "snapkv", 64, compress_after="end")
    with pytest.raises(PyramidKVError, match=r"compress_after: 'forward' .*every prompt query"):
        CompressedCache(model, "h2o", 64, compress_after="forward")
    with pytest.raises(PyramidKVError, match=r"compress_after: 'forward' .*chunked prefill"):
        CompressedCache(model, "snapkv", 64, prefill_chunk=128, compress_after="forward")
    assert CompressedCache(model, "h2o", 64).compress_after == "layer"
    assert CompressedCache(model, "snapkv", 64).compress_after == "auto"


def test_auto_batches_only_prompts_under_the_limit(monkeypatch):
    """Above the limit the default compresses layer by layer (no shared allocation), keeping the same tokens."""
    model = make_tiny("llama")
    under, _ = _prefill_and_step(model, dict(policy="snapkv", budget=64), "auto")
    shared = {layer.kept_keys.untyped_storage().data_ptr() for layer in under.layers}
    monkeypatch.setattr("pyramidkv.cache.compressed.BATCH_LIMIT", 1)
    over, _ = _prefill_and_step(model, dict(policy="snapkv", budget=64), "auto")
    apart = {layer.kept_keys.untyped_storage().data_ptr() for layer in over.layers}
    assert len(shared) == 1 and len(apart) == len(over.layers)
    for a, b in zip(under.layers, over.layers, strict=True):
        assert torch.equal(a.kept_keys, b.kept_keys)
