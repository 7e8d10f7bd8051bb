"""Decode attention over a static-shape KV cache's buffers: batched matmuls split over the slots.

What: :func:`attend` takes (batch, q_heads, q_len, dim) queries, one layer's (batch, kv_heads, capacity,
head_dim) key and value buffers and a boolean mask of the slots each query sees, and returns the attention
output as (batch, q_len, q_heads, dim). The ``groups`` query heads of a KV head become ``groups * q_len``
query rows of it, so no key or value is repeated (transformers' own SDPA path repeats them whenever a mask is
given, in 5.17) and the mask broadcasts over the group. Pure tensor code: the cache that owns the buffers
(:mod:`pyramidkv.static.cache`) computes the mask on the device and calls this.

Why: a decode step has a few such rows against thousands of slots. Masked SDPA takes the memory-efficient
kernel, which parallelises over (batch, heads, query blocks) and walks the slots serially: 3 thread blocks at
batch 1 for the embedded model (3 KV heads, one block of rows each), so most of the GPU idles while they walk
thousands of slots (docs/kernels.md, section 8). So up to ``DECODE_ROWS`` rows this module splits the work over
the slots as flash-decoding does (Dao et al. 2023, "Flash-Decoding for long-context inference"): the scores by one
batched matmul (its output spans every slot, so it fills the GPU at any batch), softmax in float32, then the
value sum as one matmul per chunk of :func:`_chunk` slots (at least ``SPLIT_BLOCKS`` products at a small
batch), the partial sums added (step times: benchmarks/README.md, ``benchmarks/cuda_graph_decode.py``). More
rows (tokens fed several at a time) keep SDPA, which has query blocks enough to parallelise over.

Static shapes and no host reads on either path: fit for a CUDA graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pyramidkv.errors import PyramidKVError

ALIGN = 16  # slots: a chunk (and so the capacity) is a multiple of this
# query rows per KV head (groups * q_len) up to which attend multiplies matrices instead of calling SDPA
DECODE_ROWS = 16
# matrix products the decode value sum offers at least: about two per SM of an H200 (132 SMs)
SPLIT_BLOCKS = 256
# chunks a layer's slots are cut into at least: rounding the capacity up to a chunk wastes < 1/32 of them
MIN_CHUNKS = 32


def _chunk(length: int, matrices: int) -> int:
    """Slots per chunk of the decode value sum for ``length`` slots and ``matrices`` = batch * kv_heads: the
    largest power of two (ALIGN at least) that still cuts the slots into ``SPLIT_BLOCKS / matrices`` chunks,
    so that a small batch offers enough products, and into ``MIN_CHUNKS``. The capacity is rounded up to a
    multiple of it, so the chunks need not divide an awkward length (8000 + 35 slots: 16 x 503)."""
    need = max(MIN_CHUNKS, -(-SPLIT_BLOCKS // matrices))
    chunk = ALIGN
    while 2 * chunk * need <= length:
        chunk *= 2
    return chunk


def _bmm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` (batched) in ``dtype``: on CUDA fp16/bf16 products come out of cuBLAS in float32 unrounded."""
    if a.dtype == dtype:
        return torch.bmm(a, b)
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=dtype)
    return torch.bmm(a, b).to(dtype)


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    chunk: int,
    sdpa_backends: Callable[[torch.device], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Attention of (batch, q_heads, q_len, dim) queries over the buffers; (batch, q_len, q_heads, dim) out.

    ``keys``/``values`` (batch, kv_heads, capacity, dim), ``capacity`` a multiple of ``chunk``; ``mask``
    bool, broadcastable to (batch, kv_heads, q_len, capacity): the slots each query token sees. Up to
    ``DECODE_ROWS`` packed rows (``groups * q_len``): :func:`_decode`; more: SDPA, under the context
    ``sdpa_backends(device)`` returns when given (the cache's choice of SDPA kernels).
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    if q_heads % kv_heads:
        raise PyramidKVError(
            f"query: got {q_heads} heads; expected a multiple of the buffers' {kv_heads} KV heads"
        )
    if chunk <= 0 or capacity % chunk:
        raise PyramidKVError(
            f"chunk: got {chunk}; expected a positive divisor of the {capacity} slots"
        )
    groups = q_heads // kv_heads
    packed = query.reshape(batch, kv_heads, groups * q_len, dim)
    if groups * q_len <= DECODE_ROWS:
        out = _decode(packed, keys, values, mask, scaling, groups, chunk)
    else:
        if q_len > 1 and groups > 1:
            mask = mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).flatten(2, 3)
        backends = (
            contextlib.nullcontext() if sdpa_backends is None else sdpa_backends(query.device)
        )
        with backends:
            out = F.scaled_dot_product_attention(
                packed, keys, values, attn_mask=mask, scale=scaling
            )
    return out.reshape(batch, q_heads, q_len, dim).transpose(1, 2).contiguous()


def _decode(
    packed: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    groups: int,
    chunk: int,
) -> torch.Tensor:
    """(batch, kv_heads, rows, dim) packed queries attended by matmuls split over the slots (module doc).

    Work grows with the slots: the score product spans all ``capacity`` columns, the value sum runs one
    product per chunk. The scale goes on the queries (in their dtype, as PyTorch's math SDPA does); scores,
    softmax and the partial sums are float32 (float64 for float64 queries; on the CPU fp16/bf16 scores are
    rounded to that dtype first), the probabilities enter the value product in the cache's dtype (as flash
    attention does), the result is cast back to the query's dtype.
    """
    batch, kv_heads, rows, dim = packed.shape
    capacity, chunks = keys.shape[2], keys.shape[2] // chunk
    exact = torch.promote_types(packed.dtype, torch.float32)
    scores = _bmm((packed * scaling).flatten(0, 1), keys.flatten(0, 1).transpose(1, 2), exact)
    scores = scores.view(batch, kv_heads, groups, rows // groups, capacity)
    scores = torch.where(mask.unsqueeze(2), scores, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, rows, chunks, chunk)
    probs = probs.transpose(2, 3).to(
        values.dtype, copy=True, memory_format=torch.contiguous_format
    )  # (batch, kv_heads, chunks, rows, chunk)
    partial = _bmm(probs.flatten(0, 2), values.view(batch * kv_heads * chunks, chunk, dim), exact)
    out = partial.view(batch, kv_heads, chunks, rows, dim).sum(2)
    return out.to(packed.dtype)
