"""The torch references of decode attention over a compressed cache, which every fused kernel is tested against
and which run where no fused kernel does.

**Chunked** (:func:`chunked_attention`). Reference decode attention over a cache read in chunks, merged with a running log-sum-exp.

A quantized cache is never decoded whole: each chunk of keys and values is decoded, attended to and
dropped, so peak memory is bounded by the chunk, not by the context. The partial results are merged as in
flash-decoding (Dao et al. 2023): keep the running maximum score ``m``, the running normaliser ``l`` and
the unnormalised output ``o``; a chunk with maximum ``m'`` rescales the old state by ``exp(m - max(m, m'))``.

GQA is handled without repeating keys: the ``G`` query heads of one KV head are laid out as a
(kv_heads, G * q_len) block and share one read of each chunk. It reads any codec (KIVI too).

**Rotated space** (:func:`rotated_attention`). Decoding a code to x_hat costs a d x d product per vector (the rotation back, x_hat = nu u Pi), and a decode
step attends over every coded token, so the decode-then-attend reference (:func:`chunked_attention`
over :meth:`~pyramidkv.cache.blocks.CodedBlocks.chunks`) spends ~2 s d^2 multiply-adds per layer and step on the
rotations alone. Pi is orthogonal, so the fused kernels' identities hold in torch too (FibQuant, arXiv
2605.11478, Sec. 3; TurboQuant, arXiv 2504.19874): q . x_hat = (q Pi_k^T) . (nu u), and sum_j p_j v_hat_j =
(sum_j p_j nu_j u_j) Pi_v. So the query is rotated once into the keys' space, the fp16 window (at most the
residual plus the new tokens) is rotated into both spaces, every block is read as nu u (a gather and a scale),
and the output is rotated back once: d^2 work per query row and window token instead of per coded token.
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
    arithmetic is float32. A query that sees no key at all gets a zero output; an empty chunk is skipped.
    """
    batch, q_heads, q_len, dim = query.shape
    state = None
    for keys, values, visible in chunks:
        if keys.shape[-2] == 0:  # an empty chunk (a recent window with nothing in it) adds nothing
            continue
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


def rotated_attention(
    query: torch.Tensor,
    codecs,
    blocks: Iterable[tuple],
    recent_keys: torch.Tensor,
    recent_values: torch.Tensor,
    recent_visible: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attention of ``query`` (batch, q_heads, q_len, d) over ``blocks`` of codes of ``codecs`` (a
    :class:`~pyramidkv.codecs.registry.CodecPair` of rotated-block codecs), each ``(keys, values, visible)`` with codes
    of (batch, kv_heads, s) vectors and ``visible`` as in :func:`.reference.chunked_attention`, then over the
    window ``recent_keys`` / ``recent_values`` (batch, kv_heads, r, d), of which ``recent_visible`` marks the
    slots each query sees: (batch, q_heads, q_len, d) in the query's dtype, float32 arithmetic as
    :func:`.reference.chunked_attention`. A block may carry its own codecs as a fourth item (a planned layer's
    rates), of the same family: they share ``codecs``' rotations."""
    compute = torch.float32
    rot_k = codecs.keys.tensors(query.device, compute)[0]
    rot_v = codecs.values.tensors(query.device, compute)[0]
    chunks = []
    for keys, values, visible, *own in blocks:
        pair = own[0] if own else codecs
        chunks.append(
            (
                pair.keys.decode_rotated(keys, compute),
                pair.values.decode_rotated(values, compute),
                visible,
            )
        )
    window = (
        recent_keys.to(compute) @ rot_k.T,
        recent_values.to(compute) @ rot_v.T,
        recent_visible,
    )
    out = chunked_attention(query.to(compute) @ rot_k.T, [*chunks, window], scaling)
    return (out @ rot_v).to(query.dtype)
