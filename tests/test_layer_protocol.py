"""Every cache layer kind through the one protocol the attention hook uses (pyramidkv.cache.protocol).

At prefill the hook calls ``layer.compress`` once per layer and never ``attend``; at each decode step it calls
``layer.attend`` once per layer and never ``compress``. The kinds: the dynamic CompressedLayer, CodedLayer and
PlannedLayer, and the static StaticBufferLayer and StaticCodedLayer. Any concrete CacheLayer of the package that this test
does not run fails it, so a new kind of layer joins the matrix.
"""

from __future__ import annotations

import inspect
from collections import Counter

import pytest
import torch

import pyramidkv.cache
import pyramidkv.static
from pyramidkv import CompressedCache, StaticCompressedCache
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.protocol import CacheLayer, ModelAttention
from pyramidkv.errors import PyramidKVError

PROMPT = torch.randint(3, 97, (1, 48), generator=torch.Generator().manual_seed(5))
KINDS = {
    "CompressedLayer": dict(options=dict(budget=16), static=False),
    "CodedLayer": dict(options=dict(budget=16, codec="fibquant:2"), static=False),
    "PlannedLayer": dict(options=dict(kv_memory="60%", plan="auto"), static=False),
    "StaticBufferLayer": dict(options=dict(budget=16), static=True),
    "StaticCodedLayer": dict(options=dict(budget=16, codec="fibquant:2"), static=True),
}


# kinds that need a model with sliding-window layers: the hook and decode are tested in tests/test_families.py,
# the layout below
SLIDING_KINDS = {"StaticSlidingLayer"}


def _concrete_layer_kinds() -> set[str]:
    found, todo = set(), [CacheLayer]
    while todo:
        kind = todo.pop()
        todo.extend(kind.__subclasses__())
        if not inspect.isabstract(kind) and kind.__module__.startswith("pyramidkv."):
            found.add(kind.__name__)
    return found


def test_every_layer_kind_of_the_package_is_in_the_matrix():
    assert pyramidkv.cache.CodedLayer and pyramidkv.static.StaticCodedLayer  # both packages loaded
    assert _concrete_layer_kinds() == set(KINDS) | SLIDING_KINDS


def _spy(layers, calls: Counter) -> None:
    """Count each layer's compress, adopt and attend calls, by instance attributes wrapping the bound
    methods."""
    for layer in layers:
        for name in ("compress", "adopt", "attend"):
            if not hasattr(layer, name):
                continue
            method = getattr(layer, name)

            def counted(*args, _method=method, _name=name, **kwargs):
                calls[_name] += 1
                return _method(*args, **kwargs)

            setattr(layer, name, counted)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_hook_calls_compress_at_prefill_and_attend_at_decode(tiny_llama, kind):
    setup = KINDS[kind]
    layers = tiny_llama.config.num_hidden_layers
    calls: Counter = Counter()
    options = {**setup["options"], "compress_after": "layer"}
    with torch.no_grad(), CompressedCache(tiny_llama, "snapkv", **options) as source:
        assert all(layer.prefilling for layer in source.layers)
        if not setup["static"]:
            _spy(source.layers, calls)
        out = tiny_llama(PROMPT, **cache_kwargs(tiny_llama, source))
        assert not any(layer.prefilling for layer in source.layers)
        cache = StaticCompressedCache(tiny_llama, source, 4) if setup["static"] else source
        assert {type(layer).__name__ for layer in cache.layers} == {kind}
        if setup["static"]:
            _spy(cache.layers, calls)
        assert calls == (Counter() if setup["static"] else Counter(compress=layers))
        calls.clear()
        token = out.logits[:, -1:].argmax(-1)
        position = torch.tensor([[PROMPT.shape[1]]])
        step = tiny_llama(token, position_ids=position, **cache_kwargs(tiny_llama, cache))
        assert calls == Counter(attend=layers)
        assert torch.isfinite(step.logits).all()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_attend_returns_the_models_layout(tiny_llama, kind):
    """attend(query, scaling, model_attention) -> (batch, q_len, q_heads, dim), as transformers' functions do."""
    setup = KINDS[kind]
    with torch.no_grad(), CompressedCache(tiny_llama, "snapkv", **setup["options"]) as source:
        tiny_llama(PROMPT, **cache_kwargs(tiny_llama, source))
        cache = StaticCompressedCache(tiny_llama, source, 4) if setup["static"] else source
        layer = cache.layers[0]
        keys = torch.randn(1, 2, 1, 16)
        layer.update(keys, torch.randn_like(keys))
        query = torch.randn(1, 4, 1, 16)
        module = tiny_llama.model.layers[0].self_attn
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        own = ModelAttention(module, sdpa_attention_forward, float_mask=False)
        assert layer.attend(query, 0.25, own).shape == (1, 1, 4, 16)


def test_a_static_sliding_layer_returns_the_models_layout():
    from pyramidkv.static.sliding import StaticSlidingLayer

    keys = torch.randn(1, 2, 7, 16)
    layer = StaticSlidingLayer(
        0, keys, torch.randn_like(keys), seen=40, sliding_window=8, max_new_tokens=4
    )
    new = torch.randn(1, 2, 1, 16)
    layer.update(new, torch.randn_like(new))
    assert layer.attend(torch.randn(1, 4, 1, 16), 0.25).shape == (1, 1, 4, 16)


def test_a_static_layer_refuses_a_prompt(tiny_llama):
    with torch.no_grad(), CompressedCache(tiny_llama, "snapkv", 16) as source:
        tiny_llama(PROMPT, **cache_kwargs(tiny_llama, source))
        layer = StaticCompressedCache(tiny_llama, source, 4).layers[0]
        assert not layer.prefilling
        with pytest.raises(PyramidKVError, match="prefilled cache"):
            layer.compress(torch.zeros(1, 4, 2, 16), torch.ones(1, 2, dtype=torch.bool), 1.0)


@pytest.mark.parametrize("kind", ["CompressedLayer", "CodedLayer"])
def test_compressed_after_the_forward_each_layer_adopts_its_part(tiny_llama, kind):
    """With ``compress_after="forward"`` the hook compresses no layer itself: the batch hands each its part."""
    layers = tiny_llama.config.num_hidden_layers
    calls: Counter = Counter()
    with torch.no_grad(), CompressedCache(tiny_llama, "snapkv", **KINDS[kind]["options"]) as cache:
        _spy(cache.layers, calls)
        tiny_llama(PROMPT, **cache_kwargs(tiny_llama, cache))
        assert calls == Counter(adopt=layers)
        assert not any(layer.prefilling for layer in cache.layers)
