"""Attention over FibQuant and TurboQuant codes in the codecs' rotated space, in torch: the path off CUDA.

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

import torch

from .reference import chunked_attention


def rotated_attention(
    query: torch.Tensor,
    coded,
    recent_keys: torch.Tensor,
    recent_values: torch.Tensor,
    causal: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Attention of ``query`` (batch, q_heads, q_len, d) over ``coded`` (:class:`~pyramidkv.coded.CodedBlocks`
    of rotated-block codecs) and then the window ``recent_keys`` / ``recent_values`` (batch, kv_heads, r, d),
    whose slots ``causal`` (broadcastable to (batch, kv_heads, q_len, r)) marks visible: (batch, q_heads, q_len,
    d) in the query's dtype, float32 arithmetic as :func:`.reference.chunked_attention`."""
    codec_k, codec_v = coded.codecs.keys, coded.codecs.values
    compute = torch.float32
    rot_k = codec_k.tensors(query.device, compute)[0]
    rot_v = codec_v.tensors(query.device, compute)[0]
    chunks = []
    for block in coded.blocks:
        keys = codec_k.decode_rotated(block.keys, compute)
        values = codec_v.decode_rotated(block.values, compute)
        chunks.append((keys, values, block.visible(query.device)))
    window = (recent_keys.to(compute) @ rot_k.T, recent_values.to(compute) @ rot_v.T, causal)
    out = chunked_attention(query.to(compute) @ rot_k.T, [*chunks, window], scaling)
    return (out @ rot_v).to(query.dtype)
