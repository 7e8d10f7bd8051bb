"""Byte accounting: what a cache really holds, and what the full fp16/bf16 cache of the same tokens would."""

from __future__ import annotations

import torch

from pyramidkv.errors import PyramidKVError


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a transformers decoder config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def max_positions(config) -> int | None:
    """The most positions the model was trained for (``max_position_embeddings``), or None if it says none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def check_positions(config, tokens: int, option: str, what: str) -> None:
    """Raise, naming ``option``, when ``tokens`` positions (``what`` they are) exceed the model's."""
    limit = max_positions(config)
    if limit is not None and tokens > limit:
        raise PyramidKVError(f"{option}: {what} make {tokens:,} positions; the model has {limit:,}")


FULL, SLIDING = "full_attention", "sliding_attention"


def layer_kinds(config) -> list[str]:
    """Each decoder layer's attention: the config's ``layer_types``, else every layer sliding when the config
    has a ``sliding_window`` (as transformers builds its caches), chunked with an ``attention_chunk_size``,
    full otherwise."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = getattr(text, "layer_types", None)
    if kinds is None:
        if getattr(text, "sliding_window", None) is not None:
            kind = SLIDING
        elif getattr(text, "attention_chunk_size", None) is not None:
            kind = "chunked_attention"
        else:
            kind = FULL
        kinds = [kind] * text.num_hidden_layers
    return list(kinds)


def compressed_layers(config) -> list[bool]:
    """Which layers a compressed cache compresses: the full-attention ones of a model that mixes them with
    sliding-window layers (which keep their window, :mod:`.sliding`); every layer of a model whose layers are
    all alike (a model whose every layer slides, as Mistral 7B v0.1 or Phi-3-mini, is compressed as full
    attention: exact while prompt and answer fit the window, beyond it the kept tokens stay visible)."""
    kinds = layer_kinds(config)
    if SLIDING in kinds and FULL in kinds:
        return [kind == FULL for kind in kinds]
    return [True] * len(kinds)


def sliding_window(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "sliding_window", None)


def token_nbytes(config, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of one token in one layer of an uncompressed cache: the key and value of every KV head."""
    _, kv_heads, head_dim = kv_geometry(config)
    return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def full_cache_nbytes(
    config, tokens: int, batch: int = 1, dtype: torch.dtype = torch.float16
) -> int:
    """Bytes of an uncompressed cache holding ``tokens`` positions for ``batch`` sequences in ``dtype``: every
    position in a compressed layer, the window in a sliding-window layer of a mixed model."""
    window = sliding_window(config)
    held = sum(
        tokens if compressed else min(tokens, window - 1)
        for compressed in compressed_layers(config)
    )
    return held * batch * token_nbytes(config, dtype)


def cache_nbytes(cache) -> int:
    """Bytes a cache object holds: its own ``nbytes()`` when it has one, else the tensors of its layers."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def softmax_extra(model) -> str | None:
    """What the model's attention adds to a softmax of ``q.k``, which attention computed by pyramidkv itself
    (over codes, or in the static cache) does not apply: ``"soft-caps its attention logits"`` (Gemma 2),
    ``"has attention sinks"`` (gpt-oss), or None."""
    text = model.config.get_text_config()
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return "soft-caps its attention logits"
    if any(hasattr(module, "sinks") for module in model.modules()):
        return "has attention sinks"
    return None
