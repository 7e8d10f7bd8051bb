"""Which attention path a quantized cache uses: the torch reference or the fused Triton kernel.

The fused kernel (:mod:`.fibquant_decode`) reads FibQuant and TurboQuant codes straight from memory; the
reference (:mod:`.reference`) decodes one block at a time. Both return the same attention (tested against
each other under ``TRITON_INTERPRET=1`` on the CPU, and natively on CUDA). ``"auto"`` takes the kernel
wherever it can run — a CUDA device, triton importable, codes it reads — and the reference elsewhere.
"""

from __future__ import annotations

import importlib.util

import torch

from ..errors import PyramidKVError

KERNELS = ("auto", "torch", "triton")
FUSED_CODECS = ("fibquant", "turboquant")  # the codecs whose codes the fused kernels read


def check_kernel_name(kernel: str, codec_name: str, option: str = "kernel") -> None:
    """What can be checked of the ``kernel`` switch before a model is loaded: its name, and for ``"triton"``
    the codec family (head-dim limits wait for the model: :func:`check_kernel`). ``option`` names the
    switch in the message (``--kernel`` on the command line)."""
    if kernel not in KERNELS:
        raise PyramidKVError(f"{option}: got {kernel!r}; expected one of {', '.join(KERNELS)}")
    if kernel == "triton" and codec_name not in FUSED_CODECS:
        raise PyramidKVError(
            f"{option}: 'triton' reads {' or '.join(FUSED_CODECS)} codes, got codec {codec_name!r}; "
            "use 'torch' or 'auto'"
        )


def _fused_error(codecs, head_dim: int) -> str | None:
    """Why the fused kernel cannot read these codecs' codes, or None when it can."""
    from .fibquant_decode import check_codec

    if codecs is None:
        return "it reads codes; give a codec (fibquant or turboquant)"
    try:
        check_codec("key codec", codecs.keys, head_dim)
        check_codec("value codec", codecs.values, head_dim)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def check_kernel(kernel: str, codecs, head_dim: int) -> bool:
    """Validate the ``kernel`` switch against the cache's codecs; True when the fused kernel may be used."""
    check_kernel_name(kernel, codecs.name if codecs is not None else "none")
    if kernel == "torch":
        return False
    reason = _fused_error(codecs, head_dim)
    if kernel == "triton":
        if reason is not None:
            raise PyramidKVError(f"kernel: 'triton' cannot be used: {reason}; use kernel='torch'")
        if importlib.util.find_spec("triton") is None:
            raise PyramidKVError("kernel: 'triton' needs the triton package; use kernel='torch'")
        return True
    # auto: only the codes validated natively on a GPU (FibQuant blocks, k >= 2); TurboQuant (k = 1) runs
    # through the kernel under the interpreter tests but takes the reference unless forced
    if reason is not None or min(codecs.keys.k, codecs.values.k) < 2:
        return False
    return importlib.util.find_spec("triton") is not None


def use_fused(kernel: str, fused_ok: bool, device: torch.device) -> bool:
    """Whether a layer on ``device`` runs the fused kernel: forced, or ``auto`` on CUDA when it can."""
    return fused_ok and (kernel == "triton" or device.type == "cuda")


def fused_attention(
    query, coded, recent_keys, recent_values, causal, scaling: float
) -> torch.Tensor:
    """Attention of ``query`` over every coded block (fused kernel) and the fp16 window, merged by LSE."""
    from .fibquant_decode import fibquant_decode_attention
    from .merge import merge_partials, window_partial

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
