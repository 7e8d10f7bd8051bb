"""The compression of the prompt waits for nothing on the device: no ``.item()``, ``.tolist()``,
``bool(tensor)`` or data-dependent shape inside a layer's compress, or inside the compression of every layer
at the end of the forward (counted as the decode host-ops benchmark counts operations). Valid-token counts are
read once per forward, in the hook, and only when there is padding."""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyramidkv import CompressedCache
from pyramidkv.cache.batched import BatchedPrefill
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
    """Count inside every layer's compress and the batched compression of all layers, ``tolist`` too (it
    reads memory without dispatching)."""
    tolist = torch.Tensor.tolist
    originals = [(CompressedLayer, "compress"), (BatchedPrefill, "_compress")]
    saved = [getattr(owner, name) for owner, name in originals]

    def counting_tolist(self):
        counter.found["tolist"] += 1
        return tolist(self)

    def counting(method):
        def wrapper(self, *args, **kwargs):
            torch.Tensor.tolist = counting_tolist
            try:
                with counter:
                    return method(self, *args, **kwargs)
            finally:
                torch.Tensor.tolist = tolist

        return wrapper

    for (owner, name), method in zip(originals, saved, strict=True):
        setattr(owner, name, counting(method))
    try:
        yield counter
    finally:
        for (owner, name), method in zip(originals, saved, strict=True):
            setattr(owner, name, method)


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
@pytest.mark.parametrize("after", ["forward", "layer"])
def test_compressing_a_layer_never_waits_for_the_device(options, padded, after):
    model = make_tiny("llama")
    ids = torch.randint(
        3, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :50] = 0
    if options["policy"] == "h2o" and after == "forward":
        pytest.skip("h2o compresses layer by layer")
    cache = CompressedCache(model, compress_after=after, **options)
    with counted_compress(_SyncCounter()) as counter, torch.inference_mode():
        model(ids, attention_mask=mask if padded else None, **cache_kwargs(model, cache))
    assert all(layer.compressed for layer in cache.layers)
    assert counter.found == {}, counter.found
    if padded:  # the counts were right: row 1 keeps none of its padding
        assert int(cache.layers[0].lengths[1].max()) <= 250
    cache.close()


@pytest.mark.parametrize(("after", "reads"), [("layer", 4), ("forward", 1)])
def test_the_counter_sees_a_wait(after, reads):
    """The counter can fail: an adaptive schedule reads its layers' preferences back, once per layer, or
    once for all of them when every layer is compressed at the end of the forward."""
    model = make_tiny("llama")
    assert len(model.model.layers) == 4
    ids = torch.randint(3, model.config.vocab_size, (1, 300))
    cache = CompressedCache(model, policy="pyramidkv-adaptive", budget=64, compress_after=after)
    with counted_compress(_SyncCounter()) as counter, torch.inference_mode():
        model(ids, **cache_kwargs(model, cache))
    assert counter.found["tolist"] == reads
    cache.close()
