"""Several compressed caches of one prompt decoded as one batch: row i holds configuration i's cache.

Decoding a small model is bound by per-step overhead, not by reading the cache (an eager decode step of the
embedded model costs about the same at batch 1 and 128: benchmarks/README.md), so the evaluation runner decodes
all configurations of a sample together instead of one after another. The cache layout already gives every
(row, KV head) its own kept length, so rows with different policies, budgets and per-layer schedules stack
by padding each layer to its longest row; the padding is never attended to. Greedy decoding is row-wise
independent, so each row produces the tokens its cache alone would (up to the float rounding of a batched
matmul, which the runner's tests bound by comparing with configurations run one at a time).
"""

from __future__ import annotations

from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.errors import PyramidKVError


def can_stack(caches: list[CompressedCache]) -> bool:
    """Whether ``caches`` (one prompt each, batch 1, compressed, nothing appended) can share one batch."""
    first = caches[0]
    same_codec = all(c.codecs == first.codecs for c in caches)
    stackable = all(layer.stackable() for cache in caches for layer in cache.layers)
    return stackable and same_codec and len({c.layers[0].seen for c in caches}) == 1


def stack_caches(model, caches: list[CompressedCache], **options) -> CompressedCache:
    """One cache of batch ``len(caches)`` whose row i decodes as ``caches[i]`` does.

    ``options`` (codec, bits, residual, kernel) must be those the caches were built with, so that tokens
    appended during decoding are stored the same way. Raises ValueError when :func:`can_stack` is False.
    """
    if not caches or not can_stack(caches):
        raise PyramidKVError(
            "caches: stacking needs compressed batch-1 caches of one prompt, with equal codecs"
        )
    stacked = CompressedCache(model, policy="full", budget="100%", **options)
    for index, layer in enumerate(stacked.layers):
        layer.stack_rows([cache.layers[index] for cache in caches])
    return stacked
