"""Reference decode attention over a cache read in chunks, merged with a running log-sum-exp.

A quantized cache is never decoded whole: each chunk of keys and values is decoded, attended to and
dropped, so peak memory is bounded by the chunk, not by the context. The partial results are merged as in
flash-decoding (Dao et al. 2023): keep the running maximum score ``m``, the running normaliser ``l`` and
the unnormalised output ``o``; a chunk with maximum ``m'`` rescales the old state by ``exp(m - max(m, m'))``.

GQA is handled without repeating keys: the ``G`` query heads of one KV head are laid out as a
(kv_heads, G * q_len) block and share one read of each chunk. This function is the reference the fused
kernels are tested against, and the path used on CPUs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def chunked_attention(query: torch.Tensor, chunks: Iterable[Chunk], scaling: float) -> torch.Tensor:
    """softmax(q K^T * scaling) V over the concatenation of ``chunks``, computed chunk by chunk.

    ``query``: (batch, q_heads, q_len, dim). Each chunk is ``(keys, values, visible)`` with keys and values
    (batch, kv_heads, s, dim) and ``visible`` a bool mask broadcastable to (batch, kv_heads, q_len, s), or
    ``None`` when every key is visible. Returns (batch, q_heads, q_len, dim) in the query's dtype; the
    arithmetic is float32. A query that sees no key at all gets a zero output.
    """
    batch, q_heads, q_len, dim = query.shape
    state = None
    for keys, values, visible in chunks:
        kv_heads = keys.shape[1]
        group = q_heads // kv_heads
        q = query.float().reshape(batch, kv_heads, group * q_len, dim)
        scores = torch.matmul(q, keys.float().transpose(-1, -2)) * scaling  # (b, kv, g*q, s)
        if visible is not None:
            seen = visible.expand(batch, kv_heads, q_len, keys.shape[-2]).repeat(1, 1, group, 1)
            scores = scores.masked_fill(~seen, float("-inf"))
        chunk_max = scores.amax(dim=-1, keepdim=True)
        if state is None:
            running_max = chunk_max
            weights = torch.exp(scores - running_max.clamp_min(-1e30))
            norm = weights.sum(-1, keepdim=True)
            out = torch.matmul(weights, values.float())
        else:
            running_max, norm, out = state
            new_max = torch.maximum(running_max, chunk_max)
            safe = new_max.clamp_min(-1e30)  # rows that have seen nothing yet stay at zero weight
            rescale = torch.exp(running_max - safe)
            weights = torch.exp(scores - safe)
            norm = norm * rescale + weights.sum(-1, keepdim=True)
            out = out * rescale + torch.matmul(weights, values.float())
            running_max = new_max
        state = (running_max, norm, out)
    if state is None:
        return torch.zeros_like(query)
    _, norm, out = state
    out = torch.where(norm > 0, out / norm.clamp_min(1e-30), torch.zeros_like(out))
    return out.reshape(batch, q_heads, q_len, dim).to(query.dtype)
