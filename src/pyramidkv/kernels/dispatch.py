"""Which attention path a quantized cache uses: the torch reference or the fused Triton kernel.

The fused kernel (:mod:`.fibquant_decode`) reads FibQuant codes straight from memory; the reference
(:mod:`.reference`) decodes one block at a time. Both return the same attention (tested against each other
under ``TRITON_INTERPRET=1`` on the CPU, and natively on CUDA).
"""

from __future__ import annotations

import torch

from ..errors import PyramidKVError

KERNELS = ("torch", "triton")


def check_kernel(kernel: str, codecs, head_dim: int) -> str:
    """Validate the ``kernel`` switch against the cache's codecs; returns it."""
    if kernel not in KERNELS:
        raise PyramidKVError(f"kernel: got {kernel!r}; expected one of {', '.join(KERNELS)}")
    if kernel == "triton":
        from .fibquant_decode import check_codec

        if codecs is None:
            raise PyramidKVError(
                "kernel: 'triton' reads codes; give a codec (fibquant) or use kernel='torch'"
            )
        try:
            check_codec("key codec", codecs.keys, head_dim)
            check_codec("value codec", codecs.values, head_dim)
        except (TypeError, ValueError) as exc:
            raise PyramidKVError(f"kernel: {exc}") from exc
    return kernel


def fused_attention(
    query, coded, recent_keys, recent_values, causal, scaling: float
) -> torch.Tensor:
    """Attention of ``query`` over every coded block (fused kernel) and the fp16 window, merged by LSE."""
    from .fibquant_decode import fibquant_decode_attention, merge_partials, window_partial

    codecs = coded.codecs
    partials = [
        fibquant_decode_attention(
            query, b.keys, b.values, codecs.keys, codecs.values, scaling, lengths=b.lengths
        )
        for b in coded.blocks
    ]
    partials.append(window_partial(query, recent_keys, recent_values, scaling, causal))
    out, _ = merge_partials(partials)
    return out.to(query.dtype)
