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


def token_nbytes(config, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of one token in one layer of an uncompressed cache: the key and value of every KV head."""
    _, kv_heads, head_dim = kv_geometry(config)
    return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def full_cache_nbytes(
    config, tokens: int, batch: int = 1, dtype: torch.dtype = torch.float16
) -> int:
    """Bytes of an uncompressed cache holding ``tokens`` positions for ``batch`` sequences in ``dtype``."""
    layers, _, _ = kv_geometry(config)
    return layers * batch * tokens * token_nbytes(config, dtype)


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
