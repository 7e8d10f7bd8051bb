"""Planning a decode launch, outside any captured graph: tuning, the kernel and split of a block, workspaces.

flashinfer separates building a kernel, planning its launch and running it, so that the plan is made once and
a captured graph only runs. Here :func:`plan_block` chooses, per block of codes, the CUDA mma kernel's variant
(:mod:`.cuda_decode`) or the Triton kernel (:mod:`.triton_decode`) and how many ranges the sequence is split
into (flash-decoding, Dao et al. 2023); :func:`make_workspace` allocates the partials they write, and
:func:`rotate_query` turns the query into key space once. :func:`check_codec` is the one statement of which
codes the fused kernels read.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, fields

import torch

from pyramidkv.checks import check_int
from pyramidkv.codecs.packing import MAX_BITS
from pyramidkv.codecs.rotated import RotatedBlockCodec
from pyramidkv.errors import PyramidKVError
from pyramidkv.kernels import cuda_decode
from pyramidkv.kernels.launch import LOG2E


@dataclass(frozen=True)
class DecodeTuning:
    """Launch choices of the decode kernel; defaults measured on the H200 (benchmarks/decode_attention.py).

    block: tokens per tile (>= 16 for ``tl.dot``); waves: programs per SM the default split aims at (more
    splits hide the latency of the gathers; each adds one partial row to merge); shared_gather: gather
    codewords from a shared-memory copy of the codebook (``tl.gather``) instead of from global memory, whose
    L1 serves a warp's scattered loads one cache line at a time; row_gather (with shared_gather): gather
    whole codewords as one packed integer word each (k x 16 bits <= 64), one index and one gather per block
    of k coordinates instead of k (off until timed on a GPU); codebook_dtype: the dtype the
    codebook, the rotated query and the probabilities enter ``tl.dot`` in (fp16 halves the gathered bytes
    and keeps 10 mantissa bits, as TF32 does); mma: read the codes :func:`.cuda_decode.unsupported` accepts
    (FibQuant at 1.5 to 4 bits, TurboQuant at 2 to 4) with the CUDA kernel of :mod:`.cuda_decode` instead,
    where it runs (sm_80 or later, NVRTC found, float16 codebook), with ``mma_warps`` warps per block (None:
    8 or 4, whichever fills more of the SMs' block slots, :func:`.cuda_decode.filling_variant`) and a ring of
    ``mma_stages`` tiles per warp in slots of ``mma_slot_tiles`` (None: :func:`.cuda_decode.default_slot_tiles`,
    and :data:`.cuda_decode.RING` slots).
    """

    block: int = 64
    num_warps: int = 4
    num_stages: int = 2
    waves: int = 8
    shared_gather: bool = True
    row_gather: bool = False
    codebook_dtype: torch.dtype = torch.float16
    mma: bool = True
    mma_warps: int | None = None
    mma_stages: int | None = None
    mma_slot_tiles: int | None = None

    def gather_mode(self, *books: torch.Tensor) -> int:
        """The kernel's GATHER for these (N, k) codebooks: 0 global memory, 1 shared flat, 2 shared packed
        codewords (``row_gather``, where every codeword fits one 64-bit word; else 1)."""
        if not self.shared_gather:
            return 0
        return 2 if self.row_gather and all(_word_dtype(b) is not None for b in books) else 1

    def __post_init__(self) -> None:
        if self.block < 16 or self.block & (self.block - 1):
            raise PyramidKVError(f"block must be a power of two >= 16, got {self.block}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise PyramidKVError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")
        if self.waves < 1:
            raise PyramidKVError(f"waves must be >= 1, got {self.waves}")
        if self.num_stages < 1:
            raise PyramidKVError(f"num_stages must be >= 1, got {self.num_stages}")
        cuda_decode.check_launch(self.mma_warps, self.mma_stages, ("mma_warps", "mma_stages"))
        if self.mma_slot_tiles is not None and self.mma_slot_tiles not in cuda_decode.SLOT_TILES:
            raise PyramidKVError(
                f"mma_slot_tiles must be one of {cuda_decode.SLOT_TILES}, got {self.mma_slot_tiles}"
            )
        if self.codebook_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise PyramidKVError(
                f"codebook_dtype must be float16, bfloat16 or float32, got {self.codebook_dtype}"
            )


TUNING_FIELDS = tuple(f.name for f in fields(DecodeTuning))


DEFAULT_TUNING = DecodeTuning()


_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _word_dtype(book: torch.Tensor) -> torch.dtype | None:
    """The integer dtype holding one whole codeword of an (N, k) codebook (k x element size <= 8 bytes)."""
    return _WORDS.get(book.shape[-1] * book.element_size())


def packed_words(book: torch.Tensor) -> torch.Tensor:
    """(N,) integers, codeword n's k entries bit for bit (entry j in bits [j e, (j + 1) e), e its width)."""
    return book.contiguous().view(_word_dtype(book)).reshape(-1)


def check_codec(name: str, codec: object, dim: int) -> None:
    """Raise unless ``codec`` is a rotated-block codec of head dimension ``dim`` that the fused kernels (decode
    and encode) read: the one statement of their limits, which ``kernel="auto"`` consults to fall back."""
    if not isinstance(codec, RotatedBlockCodec):
        raise TypeError(
            f"{name} must be a FibQuant or TurboQuant codec, got {type(codec).__name__}"
        )
    if codec.d != dim:
        raise PyramidKVError(f"{name}.d must equal the query's head dim {dim}, got {codec.d}")
    if codec.d < 16 or codec.d & (codec.d - 1):
        raise PyramidKVError(
            f"{name}: the fused kernels read head dims that are powers of two >= 16; got d={codec.d}"
        )
    if codec.k & (codec.k - 1) or codec.index_bits > MAX_BITS:
        raise PyramidKVError(
            f"{name}: the fused kernel reads blocks of k = a power of two with indices of at most "
            f"{MAX_BITS} bits; got k={codec.k}, N={codec.n}"
        )


def make_workspace(
    batch: int, kv_heads: int, rows: int, split: int, dim: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split partials ``(acc (b, kv, split, rows, dim), max (b, kv, split, rows), sum (same))``, float32.

    Preallocate once and pass as ``workspace`` to reuse them across decode steps (static shapes, e.g.
    for CUDA graphs); the kernel writes every entry, so no zeroing is needed.
    """
    acc = torch.empty(batch, kv_heads, split, rows, dim, dtype=torch.float32, device=device)
    return (
        acc,
        torch.empty(acc.shape[:-1], dtype=torch.float32, device=device),
        torch.empty(acc.shape[:-1], dtype=torch.float32, device=device),
    )


def default_split(
    batch: int, kv_heads: int, tiles: int, device: torch.device, waves: int = 2
) -> int:
    """Enough programs for ``waves`` per SM of the GPU, never more splits than tiles."""
    units = (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 1
    )
    return max(1, min(tiles, math.ceil(waves * units / (batch * kv_heads))))


def tiles(tokens: int, tuning: DecodeTuning) -> int:
    """Tiles of ``tuning.block`` tokens that cover ``tokens`` (at least one, so an empty block still writes)."""
    return max(1, -(-tokens // tuning.block))


def split_count(
    shape: tuple[int, int, int],
    tuning: DecodeTuning,
    device: torch.device,
    split: int | None = None,
) -> int:
    """Sequence ranges for codes of ``shape`` (batch, kv_heads, s): ``split`` checked, or the default that fills
    the device (``tuning.waves`` programs per SM)."""
    if split is None:
        split = default_split(shape[0], shape[1], tiles(shape[2], tuning), device, tuning.waves)
    return check_int("split", split, 1)


def plan_block(
    shape: tuple[int, int, int],
    codec_k: RotatedBlockCodec,
    codec_v: RotatedBlockCodec,
    rows: int,
    tuning: DecodeTuning,
    device: torch.device,
    split: int | None = None,
) -> tuple[cuda_decode.MmaVariant | None, int]:
    """Which kernel reads a block of codes of ``shape`` (batch, kv_heads, s) — the variant of the CUDA mma
    kernel (:func:`.cuda_decode.variant`), or None: the Triton kernel — and its split (``split`` checked, or
    that kernel's default).

    Remembered per (shape, codecs, rows, tuning, device, split): an eager decode step plans every coded block
    of every layer, and the plan depends on nothing else (the device's properties are fixed in a process).
    """
    # a codec's book_key is all a plan reads of it (what unsupported, same_codebook and affine_keys see)
    key = (tuple(shape), codec_k.book_key, codec_v.book_key, rows, tuning, device, split)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(shape, codec_k, codec_v, rows, tuning, device, split)
        with _PLANS_LOCK:  # generations in several threads may plan at once
            _PLANS[key] = plan
            while len(_PLANS) > PLANS_KEPT:
                del _PLANS[next(iter(_PLANS))]  # the oldest: dicts keep insertion order
    return plan


# plan_block's memory, bounded: a long generation adds a block shape at every flush of the window
PLANS_KEPT = 4096


_PLANS: dict[tuple, tuple[cuda_decode.MmaVariant | None, int]] = {}


_PLANS_LOCK = threading.Lock()


def _plan(shape, codec_k, codec_v, rows, tuning, device, split):
    """:func:`plan_block`, not remembered."""
    if not (
        tuning.mma
        and tuning.codebook_dtype == torch.float16
        and cuda_decode.usable(codec_k, codec_v, codec_k.d, rows, device)
    ):
        return None, split_count(shape, tuning, device, split)
    kernel, default = cuda_decode.filling_variant(
        shape,
        codec_k,
        codec_v,
        rows,
        tuning.mma_warps,
        tuning.mma_stages,
        device,
        tuning.mma_slot_tiles,
    )
    return kernel, default if split is None else split_count(shape, tuning, device, split)


def rotate_query(
    query: torch.Tensor,
    codec_k: RotatedBlockCodec,
    scaling: float,
    kv_heads: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(batch, kv_heads, rows, d) query rows rotated once into key space (u = x Pi^T), with the softmax scale and
    log2(e) folded in (the kernel's scores are base 2); row g q_len + i is query head h G + g, token i."""
    batch, q_heads, q_len, dim = query.shape
    rotation = codec_k.tensors(query.device, torch.float32)[0]
    flat = query.to(torch.float32, memory_format=torch.contiguous_format).view(-1, dim)
    # one launch, the scale folded in (beta = 0: the first argument is ignored)
    q_rot = torch.addmm(flat, flat, rotation.T, beta=0, alpha=scaling * LOG2E)
    return q_rot.to(dtype).view(batch, kv_heads, (q_heads // kv_heads) * q_len, dim)


def plane_chunk(codec: RotatedBlockCodec) -> int:
    """The kernels' PLANES for ``codec``'s codes: the coordinates of a chunk (d / 4) where they are 3-bit codes in
    planes (:mod:`pyramidkv.codecs.planes`), 0 where they are the bit stream."""
    return codec.d // 4 if codec.layout == "planes" else 0
