"""Which attention path a quantized cache uses, and the fused path's launches over a layer's blocks.

The fused kernels read FibQuant and TurboQuant codes straight from memory: per block, the CUDA mma kernel
(:mod:`.cuda_decode`) where its variants cover the codes, else the Triton kernel (:mod:`.triton_decode`), as
:func:`pyramidkv.kernels.plan.plan_block` decides; then one epilogue (:mod:`.epilogue`). The torch references
(:mod:`.reference`) return the same attention (tested against each other under ``TRITON_INTERPRET=1`` on the
CPU, and natively on CUDA). ``"auto"`` takes the fused path wherever it can run — a CUDA device, triton
importable, codes it reads — and the torch path elsewhere.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import torch

from pyramidkv.codecs.registry import ROTATED_CODECS
from pyramidkv.codecs.rotated import RotatedBlockCodec, VectorCodes
from pyramidkv.errors import PyramidKVError
from pyramidkv.kernels import cuda_decode
from pyramidkv.kernels.epilogue import decode_epilogue
from pyramidkv.kernels.launch import LOG2E
from pyramidkv.kernels.merge import merge_splits
from pyramidkv.kernels.plan import (
    DEFAULT_TUNING,
    TUNING_FIELDS,
    DecodeTuning,
    check_codec,
    make_workspace,
    plan_block,
    rotate_query,
)
from pyramidkv.kernels.triton_decode import launch_triton_partials, triton

KERNELS = ("auto", "torch", "triton")
FUSED_CODECS = ROTATED_CODECS  # the codecs whose codes the fused kernels read
# Query rows per KV head (group x new tokens) one fused call attends: the epilogue holds a (rows, d) tile and
# unrolls its split merge per row, so its shared memory grows with the rows (sm_90 cubins, offline compile:
# 24 rows at d = 64 take 70 KB, 32 at d = 128 94 KB, 192 at d = 64 450 KB, past the card's 227 KB). More rows
# (a prefill chunk, teacher-forced blocks) are compute-bound and attend in torch.
FUSED_ROWS = 32


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


def fused_error(codecs, head_dim: int) -> str | None:
    """Why the fused kernel cannot read these codecs' codes, or None when it can."""

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
    reason = fused_error(codecs, head_dim)
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


def fused_rows(query: torch.Tensor, kv_heads: int) -> bool:
    """Whether ``query`` (batch, q_heads, q_len, d) has few enough rows per KV head for one fused call
    (:data:`FUSED_ROWS`)."""
    return (query.shape[1] // kv_heads) * query.shape[2] <= FUSED_ROWS


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

    codec_k, codec_v = coded.codecs.keys, coded.codecs.values
    tuning = DEFAULT_TUNING
    batch, q_heads, q_len, dim = query.shape
    kv_heads = recent_keys.shape[1]
    rows = (q_heads // kv_heads) * q_len
    plans = [
        plan_block(b.keys.shape, b.codecs.keys, b.codecs.values, rows, tuning, query.device)
        for b in coded.blocks
    ]
    # no coded block yet: zero splits, and the epilogue attends over the window alone
    workspace = make_workspace(batch, kv_heads, rows, sum(s for _, s in plans), dim, query.device)
    # blocks of several rates (a planned layer) share the rotation, so the query is rotated once
    q_rot = rotate_query(query, codec_k, scaling, kv_heads, tuning.codebook_dtype)
    offset = 0
    for block, (kernel, split) in zip(coded.blocks, plans, strict=True):
        launch_partials(
            q_rot, block.keys, block.values, block.codecs.keys, block.codecs.values, block.lengths,
            workspace, offset, split, tuning, kernel,
        )  # fmt: skip
        offset += split
    rotation = codec_v.tensors(query.device, torch.float32)[0]
    return decode_epilogue(workspace, rotation, query, recent_keys, recent_values, scaling)


def _check_shapes(query, codes_k, codes_v, lengths) -> None:
    if query.dim() != 4:
        raise PyramidKVError(
            f"query must be (batch, q_heads, q_len, dim), got shape {tuple(query.shape)}"
        )
    batch, q_heads = query.shape[:2]
    kv_heads, s_kv = codes_k.shape[1], codes_k.shape[2]
    if codes_k.shape != (batch, kv_heads, s_kv) or codes_v.shape != codes_k.shape:
        raise PyramidKVError(
            f"codes_k and codes_v must both be (batch={batch}, kv_heads, s), got {codes_k.shape} and {codes_v.shape}"
        )
    if q_heads % kv_heads:
        raise PyramidKVError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}")
    if lengths is not None and tuple(lengths.shape) != (batch, kv_heads):
        raise PyramidKVError(
            f"lengths must be (batch, kv_heads) = ({batch}, {kv_heads}), got {tuple(lengths.shape)}"
        )


def fibquant_decode_attention(
    query: torch.Tensor,
    codes_k: VectorCodes,
    codes_v: VectorCodes,
    codec_k: RotatedBlockCodec,
    codec_v: RotatedBlockCodec,
    scaling: float,
    lengths: torch.Tensor | None = None,
    split: int | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    tuning: DecodeTuning | None = None,
    **overrides,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``query`` (batch, q_heads, q_len, dim) over one block of FibQuant/TurboQuant codes.

    ``codes_k`` / ``codes_v``: codes of keys / values shaped (batch, kv_heads, s); ``lengths`` (batch,
    kv_heads) integers: row (b, h) sees its first ``lengths[b, h]`` slots (clipped to [0, s]; None: all s).
    Every key is visible to every query token (codes hold past tokens only). ``split``: ranges the sequence
    is cut into (default: enough to fill the device). ``tuning`` or keyword ``overrides`` of its fields
    (``block=64``, ``num_warps=8``) choose the launch. Returns ``(out, lse)``: out (batch, q_heads, q_len,
    dim) float32, the softmax-normalised output over this block, and lse (batch, q_heads, q_len) float32, the
    natural-log sum of exp(scores); a row that sees no key gets out = 0, lse = -inf. A layer with several
    blocks and the fp16 window goes through :func:`pyramidkv.kernels.dispatch.fused_attention` instead.
    """
    if triton is None:
        raise RuntimeError(
            "fibquant_decode_attention needs triton; use kernels.chunked_attention instead"
        )
    unknown = set(overrides) - set(TUNING_FIELDS)
    if unknown:
        raise TypeError(f"unknown tuning options {sorted(unknown)}; known: {TUNING_FIELDS}")
    tuning = replace(tuning or DEFAULT_TUNING, **overrides)
    _check_shapes(query, codes_k, codes_v, lengths)
    batch, q_heads, q_len, dim = query.shape
    check_codec("codec_k", codec_k, dim)
    check_codec("codec_v", codec_v, dim)
    kv_heads = codes_k.shape[1]
    rows = (q_heads // kv_heads) * q_len
    kernel, split = plan_block(codes_k.shape, codec_k, codec_v, rows, tuning, query.device, split)
    if workspace is None:
        workspace = make_workspace(batch, kv_heads, rows, split, dim, query.device)
    acc, row_max, row_sum = workspace
    if tuple(acc.shape) != (batch, kv_heads, split, rows, dim) or not acc.is_contiguous():
        raise PyramidKVError(
            f"workspace must come from make_workspace for these shapes and split={split}"
        )
    q_rot = rotate_query(query, codec_k, scaling, kv_heads, tuning.codebook_dtype)
    launch_partials(
        q_rot, codes_k, codes_v, codec_k, codec_v, lengths, workspace, 0, split, tuning, kernel
    )
    out_rot, lse = merge_splits(acc, row_max * (1.0 / LOG2E), row_sum)
    out = out_rot @ codec_v.tensors(query.device, torch.float32)[0]  # x_hat = unit Pi, once per row
    return out.reshape(batch, q_heads, q_len, dim), lse.reshape(batch, q_heads, q_len)


def launch_partials(
    q_rot: torch.Tensor,
    codes_k: VectorCodes,
    codes_v: VectorCodes,
    codec_k: RotatedBlockCodec,
    codec_v: RotatedBlockCodec,
    lengths: torch.Tensor | None,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    offset: int,
    split: int,
    tuning: DecodeTuning,
    kernel: cuda_decode.MmaVariant | None = None,
) -> None:
    """Run a decode kernel over one block of codes, writing its ``split`` partials at splits [offset, offset +
    split) of ``workspace`` (several blocks share one workspace, merged by one epilogue): the Triton kernel
    (:func:`.triton_decode.launch_triton_partials`), or, given the CUDA kernel's variant ``kernel`` (from :func:`plan_block`), that kernel."""
    if kernel is not None:
        cuda_decode.launch_mma_partials(
            q_rot, codes_k, codes_v, codec_k, codec_v, lengths, workspace, offset, split, kernel
        )
        return
    launch_triton_partials(
        q_rot, codes_k, codes_v, codec_k, codec_v, lengths, workspace, offset, split, tuning
    )
