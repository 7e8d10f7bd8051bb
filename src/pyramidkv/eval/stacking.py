"""Several compressed caches of one prompt decoded as one batch: row i holds configuration i's cache.

Decoding a small model is bound by per-step overhead, not by reading the cache (a decode step of the
embedded model costs about the same at batch 1 and 128 on the H200), so the evaluation runner decodes
all configurations of a sample together instead of one after another. The cache layout already gives every
(row, KV head) its own kept length, so rows with different policies, budgets and per-layer schedules stack
by padding each layer to its longest row; the padding is never attended to. Greedy decoding is row-wise
independent, so each row produces the tokens its cache alone would (up to the float rounding of a batched
matmul, which the runner's tests bound by comparing with configurations run one at a time).
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F

from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.codecs.rotated import VectorCodes


def can_stack(caches: list[CompressedCache]) -> bool:
    """Whether ``caches`` (one prompt each, batch 1, compressed, nothing appended) can share one batch."""
    first = caches[0]
    same_codec = all(c.codecs == first.codecs for c in caches)
    for cache in caches:
        for layer in cache.layers:
            if not layer.compressed or layer.lengths.shape[0] != 1 or layer.keys.shape[-2]:
                return False
            if layer.coded is not None and not (
                len(layer.coded.blocks) == 1
                and isinstance(layer.coded.blocks[0].keys, VectorCodes)
                and isinstance(layer.coded.blocks[0].values, VectorCodes)
            ):
                return False
    return same_codec and len({c.layers[0].seen for c in caches}) == 1


def _pad_slots(tensor: torch.Tensor, slots: int) -> torch.Tensor:
    """Pad dim 2 (the token slots of a (batch, kv_heads, s, ...) tensor) with zeros up to ``slots``."""
    missing = slots - tensor.shape[2]
    if not missing:
        return tensor
    pad = [0, 0] * (tensor.dim() - 3) + [0, missing]
    return F.pad(tensor, pad)


def _stack_codes(parts: list[VectorCodes], slots: int) -> VectorCodes:
    tensors = {
        f.name: torch.cat([_pad_slots(getattr(p, f.name), slots) for p in parts])
        for f in fields(VectorCodes)
        if isinstance(getattr(parts[0], f.name), torch.Tensor)
    }
    return VectorCodes(dtype=parts[0].dtype, **tensors)


def stack_caches(model, caches: list[CompressedCache], **options) -> CompressedCache:
    """One cache of batch ``len(caches)`` whose row i decodes as ``caches[i]`` does.

    ``options`` (codec, bits, residual, kernel) must be those the caches were built with, so that tokens
    appended during decoding are stored the same way. Raises ValueError when :func:`can_stack` is False.
    """
    if not caches or not can_stack(caches):
        raise ValueError(
            "caches: stacking needs compressed batch-1 caches of one prompt, with equal codecs"
        )
    stacked = CompressedCache(model, policy="full", budget="100%", **options)
    for index, layer in enumerate(stacked.layers):
        rows = [cache.layers[index] for cache in caches]
        layer.lazy_initialization(rows[0].keys, rows[0].values)
        layer.keys = torch.cat([r.keys for r in rows])
        layer.values = torch.cat([r.values for r in rows])
        layer.seen, layer.compressed = rows[0].seen, True
        layer.lengths = torch.cat([r.lengths for r in rows])
        if layer.coded is None:
            slots = max(r.kept_keys.shape[2] for r in rows)
            layer.kept_keys = torch.cat([_pad_slots(r.kept_keys, slots) for r in rows])
            layer.kept_values = torch.cat([_pad_slots(r.kept_values, slots) for r in rows])
        else:  # one block per row: the compressed prompt (nothing was flushed yet)
            slots = max(r.coded.blocks[0].tokens for r in rows)
            blocks = [r.coded.blocks[0] for r in rows]
            layer.coded.append(
                _stack_codes([b.keys for b in blocks], slots),
                _stack_codes([b.values for b in blocks], slots),
                slots,
                layer.lengths,
            )
        layer.ragged = bool((layer.lengths != slots).any())
    return stacked
