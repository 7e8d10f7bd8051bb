"""The per-layer compression of the prompt waits for nothing on the device: no ``.item()``, ``.tolist()``,
``bool(tensor)`` or data-dependent shape inside a layer's compress (counted as the decode host-ops benchmark
counts operations). Valid-token counts are read once per forward, in the hook, and only when there is padding."""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyramidkv import CompressedCache
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.layers import CompressedLayer

from .conftest import make_tiny

SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal"}


class _SyncCounter(TorchDispatchMode):
    """Counts the operations that make the host wait for the device (on a GPU), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.found: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING:
            self.found[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counted_compress(counter: _SyncCounter):
    """Count inside every layer's compress, ``tolist`` too (it reads memory without dispatching)."""
    compress, tolist = CompressedLayer.compress, torch.Tensor.tolist

    def counting_tolist(self):
        counter.found["tolist"] += 1
        return tolist(self)

    def counting_compress(self, *args, **kwargs):
        torch.Tensor.tolist = counting_tolist
        try:
            with counter:
                return compress(self, *args, **kwargs)
        finally:
            torch.Tensor.tolist = tolist

    CompressedLayer.compress = counting_compress
    try:
        yield counter
    finally:
        CompressedLayer.compress = compress


@pytest.mark.parametrize(
    "options",
    [
        dict(policy="pyramidkv", budget=64),
        dict(policy="snapkv", budget="10%"),
        dict(policy="streamingllm", budget=64),
        dict(policy="h2o", budget=64),
        dict(policy="snapkv", kv_memory="20%"),
    ],
)
@pytest.mark.parametrize("padded", [False, True])
def test_compressing_a_layer_never_waits_for_the_device(options, padded):
    model = make_tiny("llama")
    ids = torch.randint(
        3, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :50] = 0
    cache = CompressedCache(model, **options)
    with counted_compress(_SyncCounter()) as counter, torch.inference_mode():
        model(ids, attention_mask=mask if padded else None, **cache_kwargs(model, cache))
    assert all(layer.compressed for layer in cache.layers)
    assert counter.found == {}, counter.found
    if padded:  # the counts were right: row 1 keeps none of its padding
        assert int(cache.layers[0].lengths[1].max()) <= 250
    cache.close()


def test_the_counter_sees_a_wait():
    """The counter can fail: an adaptive schedule reads its budgets back, once per layer."""
    model = make_tiny("llama")
    ids = torch.randint(3, model.config.vocab_size, (1, 300))
    cache = CompressedCache(model, policy="pyramidkv-adaptive", budget=64)
    with counted_compress(_SyncCounter()) as counter, torch.inference_mode():
        model(ids, **cache_kwargs(model, cache))
    assert counter.found["tolist"] == len(cache.layers)
    cache.close()
