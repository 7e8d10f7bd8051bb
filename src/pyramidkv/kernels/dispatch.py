"""Which attention path a quantized cache uses: the torch reference or the fused Triton kernel.

The fused kernel (:mod:`.fibquant_decode`) reads FibQuant and TurboQuant codes straight from memory; the
reference (:mod:`.reference`) decodes one block at a time. Both return the same attention (tested against
each other under ``TRITON_INTERPRET=1`` on the CPU, and natively on CUDA). ``"auto"`` takes the kernel
wherever it can run — a CUDA device, triton importable, codes it reads — and the reference elsewhere.
"""

from __future__ import annotations

import importlib.util

import torch

from ..coded import ROTATED_CODECS
from ..errors import PyramidKVError

KERNELS = ("auto", "torch", "triton")
FUSED_CODECS = ROTATED_CODECS  # the codecs whose codes the fused kernels read


def check_kernel_name(kernel: str, codec_name: str, option: str = "kernel") -> None:
    """What can be checked of the ``kernel`` switch before a model is loaded: its name, and for ``"triton"``
    the codec family (head-dim limits wait for the model: :func:`check_kernel`). ``option`` names the
    switch in the message (``--kernel`` on the command line)."""
    if kernel not in KERNELS:
        raise PyramidKVError(f"{option}: got {kernel!r}; expected one of {', '.join(KERNELS)}")
    if kernel == "triton" and not all(side in FUSED_CODECS for side in codec_name.split("/")):
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
    # auto: every code the kernels read; FibQuant (k >= 2) and TurboQuant (k = 1) both passed the kernel
    # tests natively on the H200 (tests/test_kernel_fibquant.py, 2026-11-29)
    if reason is not None:
        return False
    return importlib.util.find_spec("triton") is not None


def use_fused(kernel: str, fused_ok: bool, device: torch.device) -> bool:
    """Whether a layer on ``device`` runs the fused kernel: forced, or ``auto`` on CUDA when it can."""
    return fused_ok and (kernel == "triton" or device.type == "cuda")


def fused_attention(
    query: torch.Tensor,
    coded,
    recent_keys: torch.Tensor,
    recent_values: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Attention of ``query`` (b, q_heads, q_len, d) over every coded block and the fp16 window, whose last
    q_len slots are the new tokens (causal among them): (b, q_len, q_heads, d) in the query's dtype.

    The query is rotated once; each block's kernel writes its split partials into one shared workspace; one
    epilogue launch merges them with the window, rotates back and writes the model's layout
    (:mod:`.epilogue`). That is a handful of torch operations per layer and step instead of ~80.
    """
    from .epilogue import decode_epilogue
    from .fibquant_decode import (
        DEFAULT_TUNING,
        launch_partials,
        make_workspace,
        plan_block,
        rotate_query,
    )

    codec_k, codec_v = coded.codecs.keys, coded.codecs.values
    tuning = DEFAULT_TUNING
    batch, q_heads, q_len, dim = query.shape
    kv_heads = recent_keys.shape[1]
    rows = (q_heads // kv_heads) * q_len
    plans = [
        plan_block(b.keys.shape, codec_k, codec_v, rows, tuning, query.device) for b in coded.blocks
    ]
    # no coded block yet: zero splits, and the epilogue attends over the window alone
    workspace = make_workspace(batch, kv_heads, rows, sum(s for _, s in plans), dim, query.device)
    q_rot = rotate_query(query, codec_k, scaling, kv_heads, tuning.codebook_dtype)
    offset = 0
    for block, (kernel, split) in zip(coded.blocks, plans, strict=True):
        launch_partials(
            q_rot, block.keys, block.values, codec_k, codec_v, block.lengths, workspace, offset,
            split, tuning, kernel,
        )  # fmt: skip
        offset += split
    rotation = codec_v.tensors(query.device, torch.float32)[0]
    return decode_epilogue(workspace, rotation, query, recent_keys, recent_values, scaling)
