"""Attention over FibQuant and TurboQuant codes in the codecs' rotated space, in torch: where no fused kernel runs.

Decoding a code to x_hat costs a d x d product per vector (the rotation back, x_hat = nu u Pi), and a decode
step attends over every coded token, so the decode-then-attend reference (:func:`.reference.chunked_attention`
over :meth:`~pyramidkv.coded.CodedBlocks.chunks`) spends ~2 s d^2 multiply-adds per layer and step on the
rotations alone. Pi is orthogonal, so the fused kernels' identities hold in torch too (FibQuant, arXiv
2605.11478, Sec. 3; TurboQuant, arXiv 2504.19874): q . x_hat = (q Pi_k^T) . (nu u), and sum_j p_j v_hat_j =
(sum_j p_j nu_j u_j) Pi_v. So the query is rotated once into the keys' space, the fp16 window (at most the
residual plus the new tokens) is rotated into both spaces, every block is read as nu u (a gather and a scale),
and the output is rotated back once: d^2 work per query row and window token instead of per coded token.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..codecs.rotated import VectorCodes
from .reference import chunked_attention


def rotated_attention(
    query: torch.Tensor,
    codecs,
    blocks: Iterable[tuple[VectorCodes, VectorCodes, torch.Tensor | None]],
    recent_keys: torch.Tensor,
    recent_values: torch.Tensor,
    recent_visible: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attention of ``query`` (batch, q_heads, q_len, d) over ``blocks`` of codes of ``codecs`` (a
    :class:`~pyramidkv.coded.CodecPair` of rotated-block codecs), each ``(keys, values, visible)`` with codes
    of (batch, kv_heads, s) vectors and ``visible`` as in :func:`.reference.chunked_attention`, then over the
    window ``recent_keys`` / ``recent_values`` (batch, kv_heads, r, d), of which ``recent_visible`` marks the
    slots each query sees: (batch, q_heads, q_len, d) in the query's dtype, float32 arithmetic as
    :func:`.reference.chunked_attention`."""
    compute = torch.float32
    rot_k = codecs.keys.tensors(query.device, compute)[0]
    rot_v = codecs.values.tensors(query.device, compute)[0]
    chunks = [
        (
            codecs.keys.decode_rotated(keys, compute),
            codecs.values.decode_rotated(values, compute),
            visible,
        )
        for keys, values, visible in blocks
    ]
    window = (
        recent_keys.to(compute) @ rot_k.T,
        recent_values.to(compute) @ rot_v.T,
        recent_visible,
    )
    out = chunked_attention(query.to(compute) @ rot_k.T, [*chunks, window], scaling)
    return (out @ rot_v).to(query.dtype)
