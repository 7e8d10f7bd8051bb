"""The attention function pyramidkv registers with transformers, and its installation on a model.

transformers 5.x lets a library add an attention implementation through ``AttentionInterface`` (and the
matching mask builder through ``AttentionMaskInterface``); a model whose config names it calls it in every
attention layer with the post-RoPE queries, keys and values. That is the one seam pyramidkv needs: at
prefill the function sees the queries that score the prompt (SnapKV/PyramidKV's observation window, H2O's
accumulated attention), and at decode it reads a cache whose rows have lengths of their own. No model class
is patched.

The function only acts for a layer of a :class:`~pyramidkv.cache.compressed.CompressedCache`, which announces itself
in ``update`` just before the model calls attention; for any other cache it hands over to the model's
original implementation, so a model with pyramidkv installed still works with a plain ``DynamicCache``.
Installation is reference-counted per model and undone when the last compressed cache on it is closed or
garbage collected.
"""

from __future__ import annotations

import sys
import weakref
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from pyramidkv.cache.accounting import FULL, SLIDING, layer_kinds
from pyramidkv.cache.protocol import CacheLayer, ModelAttention
from pyramidkv.errors import UnsupportedModelError

NAME = "pyramidkv"

# The compressed layer whose ``update`` ran last, waiting for its attention call.
_PENDING: ContextVar[CacheLayer | None] = ContextVar("pyramidkv_pending_layer", default=None)
# the valid-token counts of the last mask read: (weak reference to the mask, key length, counts per row)
_COUNTS: ContextVar[tuple | None] = ContextVar("pyramidkv_valid_counts", default=None)


def announce(layer: CacheLayer) -> None:
    """Called by a compressed layer's ``update``: the next attention call of this layer is ours."""
    _PENDING.set(layer)


# The model's own implementation, by id of the config object its attention modules hold.
_FALLBACK: dict[int, str] = {}


def _fallback(module) -> str:
    return _FALLBACK.get(id(getattr(module, "config", None)), "sdpa")


def _own_function(module, name: str):
    """The attention function the model would call: a registered one (SDPA, flash, ...), or for ``"eager"``
    the ``eager_attention_forward`` of the module's own modeling file, which applies what the architecture adds
    to a softmax (Gemma 2's logit soft-capping, gpt-oss's sinks)."""
    if name == "eager":
        found = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if found is not None:
            return found
    return AttentionInterface._global_mapping.get(name, sdpa_attention_forward)


def pyramidkv_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs
):
    """Attention for one layer: the model's own over the prompt, then ``layer.compress`` (or, when the cache
    compresses every layer at the end of the forward, ``layer.batched_prefill.observe``, :mod:`.batched`); at decode,
    ``layer.attend`` (:mod:`.protocol`)."""
    layer = _PENDING.get()
    name = _fallback(module)
    own = ModelAttention(
        module,
        _own_function(module, name),
        float_mask=name != "sdpa",
        dropout=dropout,
        kwargs=kwargs,
        mask=attention_mask,
    )
    if layer is None or layer.layer_idx != getattr(module, "layer_idx", None):
        return own.prefill(query, key, value, attention_mask, scaling)
    _PENDING.set(None)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer.prefilling:
        output = own.prefill(query, key, value, attention_mask, scaling)
        batch = layer.batched_prefill
        if batch is not None and batch.holds(layer):  # compressed with every layer, at the end
            batch.observe(layer, query, attention_mask, scaling)
            return output
        valid = valid_keys(attention_mask, key.shape[0], key.shape[-2], key.device)
        layer.compress(query, valid, scaling, counts=valid_counts(attention_mask, valid))
        return output
    output = layer.attend(query, scaling, own)
    if layer.chunked and query.shape[-2] > 1:  # a chunk of the prompt: back to the budget
        layer.recompress(
            query,
            valid_keys(attention_mask, query.shape[0], query.shape[-2], query.device),
            scaling,
        )
    elif layer.decoding is not None:  # generation under a decode budget
        layer.decoding.after_step(layer, query, scaling)
    return output, None


def valid_counts(mask: torch.Tensor | None, valid: torch.Tensor) -> list[int]:
    """Valid tokens of each row, on the host: every token without a mask; with one, read from the device once
    per forward (its layers share the mask object), so the per-layer compression waits for nothing."""
    batch, length = valid.shape
    if mask is None:
        return [length] * batch
    memo = _COUNTS.get()
    if memo is not None and memo[0]() is mask and memo[1] == length:
        return memo[2]
    counts = valid.sum(dim=1).tolist()
    _COUNTS.set((weakref.ref(mask), length, counts))
    return counts


def valid_keys(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """(batch, length) bool: which prompt positions are real tokens, read off the 4-D mask's last query row.

    With left padding the last query is a real token that sees every real key; padded keys are masked for it.
    A ``None`` mask means no padding.
    """
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    row = mask[:, 0, -1, -length:]
    if row.dtype == torch.bool:
        return row.expand(batch, length).clone()
    return (row > torch.finfo(row.dtype).min / 2).expand(batch, length).clone()


AttentionInterface.register(NAME, pyramidkv_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@dataclass
class _Installation:
    original: str | None
    users: int


_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SUPPORTED_FALLBACKS = ("sdpa", "eager")


def check_hookable(model) -> None:
    """Raise :class:`UnsupportedModelError` unless the model's attention goes through ``AttentionInterface``."""
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"model: {name} does not route attention through transformers' AttentionInterface, so pyramidkv "
            "cannot hook it; supported are decoders such as Llama, Qwen2/3, Mistral, Gemma, Phi-3"
        )
    other = sorted({t for t in layer_kinds(model.config) if t not in (FULL, SLIDING)})
    if other:
        raise UnsupportedModelError(
            f"model: {name} has {', '.join(other)} layers; pyramidkv compresses full-attention layers and "
            "keeps sliding-window layers whole, and knows no other kind"
        )


def install(model) -> None:
    """Route the model's attention through pyramidkv (counted; undo with :func:`release`)."""
    check_hookable(model)
    entry = _INSTALLED.get(model)
    if entry is None:
        original = model.config._attn_implementation
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            _FALLBACK[id(config)] = original if original in _SUPPORTED_FALLBACKS else "sdpa"
        model.config._attn_implementation = NAME
        entry = _INSTALLED[model] = _Installation(original, 0)
    entry.users += 1


def release(model_ref: weakref.ref) -> None:
    """Drop one user; the last one restores the model's own attention implementation."""
    model = model_ref()
    entry = _INSTALLED.get(model) if model is not None else None
    if entry is None:
        return
    entry.users -= 1
    if entry.users <= 0:
        model.config._attn_implementation = entry.original
        for config in (model.config, model.config.get_text_config()):
            _FALLBACK.pop(id(config), None)
        del _INSTALLED[model]


def installed(model) -> bool:
    return model in _INSTALLED


class HookedCache:
    """What a pyramidkv cache shares: while it is alive the model routes attention through pyramidkv;
    :meth:`close` (or leaving a ``with`` block, or garbage collection) restores the model's own."""

    def _hook(self, model) -> None:
        install(model)
        self._release = weakref.finalize(self, release, weakref.ref(model))

    def close(self) -> None:
        """Restore the model's own attention implementation (idempotent)."""
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
