"""Fused decode attention on rotated-block codes (FibQuant, TurboQuant) in Triton: read indices, never x_hat.

FibQuant (arXiv 2605.11478) stores x as nu = ||x|| and, for each of the d/k blocks of the rotated unit vector
u = x Pi^T / nu, one index into a shared codebook of N codewords; TurboQuant-mse (arXiv 2504.19874) is the
case k = 1. Attention never needs x itself:

* q . x_hat = nu * sum_m <(q Pi^T)_m, c_{idx_m}>: the query is rotated once, then each key is a gather
  of d/k codewords and one dot product;
* sum_j p_j v_hat_j = (sum_j p_j nu_j unit_j) Pi: the value sum is built in rotated space and rotated
  back once per output row, not once per value.

One program handles one (sequence, KV head, split): the G * q_len query rows of that KV head share every
read of the codes (GQA), and the sequence is cut into ``split`` contiguous ranges (flash-decoding, Dao et
al. 2023) merged by log-sum-exp (:mod:`.merge`). Indices are read from the bit-packed layout of
:mod:`pyramidkv.codecs.packing` at any width from 1 to 16 bits, so 2, 3 and 4 bits per coordinate and
TurboQuant all go through this one kernel. See NOTES.md for the byte and operation counts.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, fields, replace

import torch

from ..codecs.packing import MAX_BITS, packed_bytes
from ..codecs.rotated import RotatedBlockCodec, VectorCodes
from . import mma_decode
from .merge import merge_splits

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU environment without triton; callers use the torch reference there
    triton = None

LOG2E = 1.4426950408889634


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
    and keeps 10 mantissa bits, as TF32 does); mma: read the codes :func:`.mma_decode.unsupported` accepts
    (FibQuant at 1.5 to 4 bits, TurboQuant at 2 to 4) with the CUDA kernel of :mod:`.mma_decode` instead,
    where it runs (sm_80 or later, NVRTC found, float16 codebook), with ``mma_warps`` warps per block (None:
    8 or 4, whichever fills more of the SMs' block slots, :func:`.mma_decode.filling_variant`) and a ring of
    ``mma_stages`` tiles per warp in slots of ``mma_slot_tiles`` (None: :func:`.mma_decode.default_slot_tiles`,
    and :data:`.mma_decode.RING` slots).
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
            raise ValueError(f"block must be a power of two >= 16, got {self.block}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")
        if self.waves < 1:
            raise ValueError(f"waves must be >= 1, got {self.waves}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        mma_decode.check_launch(self.mma_warps, self.mma_stages, ("mma_warps", "mma_stages"))
        if self.mma_slot_tiles is not None and self.mma_slot_tiles not in mma_decode.SLOT_TILES:
            raise ValueError(
                f"mma_slot_tiles must be one of {mma_decode.SLOT_TILES}, got {self.mma_slot_tiles}"
            )
        if self.codebook_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(
                f"codebook_dtype must be float16, bfloat16 or float32, got {self.codebook_dtype}"
            )


TUNING_FIELDS = tuple(f.name for f in fields(DecodeTuning))
DEFAULT_TUNING = DecodeTuning()
_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
# lengths that change with every flush of the window: not specialized (see epilogue.RUN_LENGTHS)
RUN_LENGTHS = ("s_kv", "chunk", "split_offset", "split_total")


def _word_dtype(book: torch.Tensor) -> torch.dtype | None:
    """The integer dtype holding one whole codeword of an (N, k) codebook (k x element size <= 8 bytes)."""
    return _WORDS.get(book.shape[-1] * book.element_size())


def packed_words(book: torch.Tensor) -> torch.Tensor:
    """(N,) integers, codeword n's k entries bit for bit (entry j in bits [j e, (j + 1) e), e its width)."""
    return book.contiguous().view(_word_dtype(book)).reshape(-1)


if triton is not None:

    @triton.jit
    def _plane_bits(coord, PLANES: tl.constexpr):
        """Where 3-bit code ``coord`` of a vector in planes of chunks of PLANES coordinates lies
        (:mod:`pyramidkv.codecs.planes`): (byte, shift) of its low 2 bits and (byte, shift) of its high bit."""
        c = coord % PLANES
        base = (coord // PLANES) * (3 * PLANES // 8)
        bit = (PLANES // 4) * ((c // 4) % 4) + 4 * (c // 16) + c % 4  # R i + m
        return base + c // 4, 2 * (c % 4), base + PLANES // 4 + bit // 8, bit % 8

    @triton.jit
    def _index_words(row_ptr, s_off, s_mask, coord, K: tl.constexpr, W: tl.constexpr,
                     NBYTES: tl.constexpr, SPAN: tl.constexpr, PLANES: tl.constexpr):  # fmt: skip
        """Codebook index of coordinate ``coord`` of tokens ``s_off`` (same shapes, broadcast): block m = coord // K
        sits in bits [m W, (m + 1) W) of the token's packed little-endian stream; or, PLANES > 0, 3-bit codes
        (k = 1) in planes of chunks of PLANES coordinates (:mod:`pyramidkv.codecs.planes`)."""
        if PLANES > 0:
            low_at, low_shift, high_at, high_shift = _plane_bits(coord, PLANES)
            ptrs = row_ptr + s_off * NBYTES
            low = tl.load(ptrs + low_at, mask=s_mask, other=0).to(tl.int32)
            high = tl.load(ptrs + high_at, mask=s_mask, other=0).to(tl.int32)
            word = ((low >> low_shift) & 3) | (((high >> high_shift) & 1) << 2)
        else:
            bit = (coord // K) * W
            byte = bit // 8
            ptrs = row_ptr + s_off * NBYTES + byte
            word = tl.load(ptrs, mask=s_mask, other=0).to(tl.int32)
            if SPAN >= 2:
                word |= (
                    tl.load(ptrs + 1, mask=s_mask & (byte + 1 < NBYTES), other=0).to(tl.int32) << 8
                )
            if SPAN >= 3:
                word |= (
                    tl.load(ptrs + 2, mask=s_mask & (byte + 2 < NBYTES), other=0).to(tl.int32) << 16
                )
            if W % 8 != 0:
                word = (word >> (bit % 8)) & ((1 << W) - 1)
        return word

    @triton.jit
    def _unit_tile(
        row_ptr, start, hi, cb_ptr, book,
        D: tl.constexpr, K: tl.constexpr, W: tl.constexpr, NBYTES: tl.constexpr,
        SPAN: tl.constexpr, PLANES: tl.constexpr, BLOCK: tl.constexpr, GATHER: tl.constexpr, FT: tl.constexpr,
    ):  # fmt: skip
        """(BLOCK, D) unit vectors in rotated space of tokens [start, start + BLOCK) (masked at ``hi``).

        GATHER 0: every coordinate is a gather from global memory (L1) at ``cb_ptr``. 1 and 2 gather from
        ``book``, the codebook loaded once per program, with ``tl.gather`` (through shared memory): 1 from
        the flat codebook, one entry per coordinate; 2 from the packed codewords (:func:`packed_words`), one
        index and one gather per block of k coordinates, its k entries then cut out of the word by shifts.
        """
        if GATHER == 2:
            flat = tl.arange(0, BLOCK * (D // K))
            s_off = start + flat // (D // K)
            coord = (flat % (D // K)) * K  # the first coordinate of each block
            word = _index_words(row_ptr, s_off, s_off < hi, coord, K, W, NBYTES, SPAN, PLANES)
            packed = tl.gather(book, word, 0)
            parts = packed[:, None] >> (tl.arange(0, K) * FT.primitive_bitwidth)[None, :]
            if FT.primitive_bitwidth == 16:
                entries = (parts & 0xFFFF).to(tl.int16).to(FT, bitcast=True)
            else:
                entries = parts.to(tl.int32).to(FT, bitcast=True)
            tile = tl.reshape(entries, (BLOCK, D))
        elif GATHER == 1:
            flat = tl.arange(0, BLOCK * D)
            s_off = start + flat // D
            coord = flat % D
            word = _index_words(row_ptr, s_off, s_off < hi, coord, K, W, NBYTES, SPAN, PLANES)
            tile = tl.reshape(tl.gather(book, word * K + coord % K, 0), (BLOCK, D))
        else:
            s_off = start + tl.arange(0, BLOCK)[:, None]
            coord = tl.arange(0, D)[None, :]
            word = _index_words(row_ptr, s_off, s_off < hi, coord, K, W, NBYTES, SPAN, PLANES)
            tile = tl.load(cb_ptr + word * K + coord % K)
        return tile

    @triton.jit
    def _load_book(cb_ptr, NK: tl.constexpr, NK_REAL: tl.constexpr):
        """The whole codebook, flat (entries, or packed codewords for GATHER 2), padded to a power of two."""
        return tl.load(cb_ptr + tl.arange(0, NK), mask=tl.arange(0, NK) < NK_REAL)

    @triton.jit(do_not_specialize=RUN_LENGTHS)
    def _decode_split_kernel(
        q_ptr, kidx_ptr, knorm_ptr, vidx_ptr, vnorm_ptr, kcb_ptr, vcb_ptr, len_ptr,
        acc_ptr, max_ptr, sum_ptr,
        s_kv, chunk, n_kv_heads, split_offset, split_total,
        kidx_sb, kidx_sh, knorm_sb, knorm_sh, vidx_sb, vidx_sh, vnorm_sb, vnorm_sh,
        ROWS: tl.constexpr, ROWS_BLOCK: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
        K_K: tl.constexpr, W_K: tl.constexpr, NB_K: tl.constexpr, SPAN_K: tl.constexpr, PL_K: tl.constexpr,
        K_V: tl.constexpr, W_V: tl.constexpr, NB_V: tl.constexpr, SPAN_V: tl.constexpr, PL_V: tl.constexpr,
        NK_K: tl.constexpr, NK_V: tl.constexpr, NK_K_REAL: tl.constexpr, NK_V_REAL: tl.constexpr,
        HAS_LENGTHS: tl.constexpr, GATHER: tl.constexpr,
    ):  # fmt: skip
        """Partial attention of the ROWS query rows of one (batch, KV head) over one split of the codes.

        q is pre-rotated and pre-scaled by scaling * log2(e), so scores are in base 2. Writes the rotated
        unnormalised output acc (ROWS, D), the running max (base 2) and the normaliser; an empty split
        writes acc = 0, max = -inf, sum = 0.
        """
        pid_bh = tl.program_id(0)
        pid_split = tl.program_id(1)
        b = pid_bh // n_kv_heads
        h = pid_bh % n_kv_heads
        length = s_kv
        if HAS_LENGTHS:
            length = tl.minimum(tl.load(len_ptr + pid_bh).to(tl.int32), s_kv)
        lo = pid_split * chunk
        hi = tl.minimum(lo + chunk, length)

        r_off = tl.arange(0, ROWS_BLOCK)
        d_off = tl.arange(0, D)
        r_mask = r_off < ROWS
        q = tl.load(
            q_ptr + (pid_bh * ROWS + r_off)[:, None] * D + d_off[None, :],
            mask=r_mask[:, None],
            other=0.0,
        )

        kidx_row = kidx_ptr + b * kidx_sb + h * kidx_sh
        vidx_row = vidx_ptr + b * vidx_sb + h * vidx_sh
        knorm_row = knorm_ptr + b * knorm_sb + h * knorm_sh
        vnorm_row = vnorm_ptr + b * vnorm_sb + h * vnorm_sh

        book_k = None
        book_v = None
        if GATHER != 0:  # whole codebooks, once per program
            book_k = _load_book(kcb_ptr, NK_K, NK_K_REAL)
            book_v = _load_book(vcb_ptr, NK_V, NK_V_REAL)
        m_i = tl.full([ROWS_BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS_BLOCK], tl.float32)
        acc = tl.zeros([ROWS_BLOCK, D], tl.float32)
        for start in range(lo, hi, BLOCK):
            s_off = start + tl.arange(0, BLOCK)
            s_mask = s_off < hi
            k_unit = _unit_tile(
                kidx_row,
                start,
                hi,
                kcb_ptr,
                book_k,
                D,
                K_K,
                W_K,
                NB_K,
                SPAN_K,
                PL_K,
                BLOCK,
                GATHER,
                q_ptr.dtype.element_ty,
            )
            k_nu = tl.load(knorm_row + s_off, mask=s_mask, other=0.0).to(tl.float32)
            scores = tl.dot(q, tl.trans(k_unit)) * k_nu[None, :]
            scores = tl.where(s_mask[None, :], scores, float("-inf"))
            # finite: every tile of [lo, hi) holds at least one visible token
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_unit = _unit_tile(
                vidx_row,
                start,
                hi,
                vcb_ptr,
                book_v,
                D,
                K_V,
                W_V,
                NB_V,
                SPAN_V,
                PL_V,
                BLOCK,
                GATHER,
                q_ptr.dtype.element_ty,
            )
            v_nu = tl.load(vnorm_row + s_off, mask=s_mask, other=0.0).to(tl.float32)
            weights = (p * v_nu[None, :]).to(v_unit.dtype)
            acc = acc * alpha[:, None] + tl.dot(weights, v_unit)
            m_i = m_new

        row = (pid_bh * split_total + split_offset + pid_split) * ROWS + r_off
        tl.store(acc_ptr + row[:, None] * D + d_off[None, :], acc, mask=r_mask[:, None])
        tl.store(max_ptr + row, m_i, mask=r_mask)
        tl.store(sum_ptr + row, l_i, mask=r_mask)


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device, not the tensors': make ``device`` current for the launch
    (a model spread over several GPUs calls the kernel for layers on each)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _span(bits: int) -> int:
    """Bytes an index of ``bits`` bits can straddle in the packed stream, over every bit offset it takes."""
    return max((j * bits % 8 + bits + 7) // 8 for j in range(8))


def check_codec(name: str, codec: object, dim: int) -> None:
    """Raise unless ``codec`` is a rotated-block codec of head dimension ``dim`` that the fused kernels (decode
    and encode) read: the one statement of their limits, which ``kernel="auto"`` consults to fall back."""
    if not isinstance(codec, RotatedBlockCodec):
        raise TypeError(
            f"{name} must be a FibQuant or TurboQuant codec, got {type(codec).__name__}"
        )
    if codec.d != dim:
        raise ValueError(f"{name}.d must equal the query's head dim {dim}, got {codec.d}")
    if codec.d < 16 or codec.d & (codec.d - 1):
        raise ValueError(
            f"{name}: the fused kernels read head dims that are powers of two >= 16; got d={codec.d}"
        )
    if codec.k & (codec.k - 1) or codec.index_bits > MAX_BITS:
        raise ValueError(
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


def _check_shapes(query, codes_k, codes_v, lengths) -> None:
    if query.dim() != 4:
        raise ValueError(
            f"query must be (batch, q_heads, q_len, dim), got shape {tuple(query.shape)}"
        )
    batch, q_heads = query.shape[:2]
    kv_heads, s_kv = codes_k.shape[1], codes_k.shape[2]
    if codes_k.shape != (batch, kv_heads, s_kv) or codes_v.shape != codes_k.shape:
        raise ValueError(
            f"codes_k and codes_v must both be (batch={batch}, kv_heads, s), got {codes_k.shape} and {codes_v.shape}"
        )
    if q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}")
    if lengths is not None and tuple(lengths.shape) != (batch, kv_heads):
        raise ValueError(
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
        raise ValueError(
            f"workspace must come from make_workspace for these shapes and split={split}"
        )
    q_rot = rotate_query(query, codec_k, scaling, kv_heads, tuning.codebook_dtype)
    launch_partials(
        q_rot, codes_k, codes_v, codec_k, codec_v, lengths, workspace, 0, split, tuning, kernel
    )
    out_rot, lse = merge_splits(acc, row_max * (1.0 / LOG2E), row_sum)
    out = out_rot @ codec_v.tensors(query.device, torch.float32)[0]  # x_hat = unit Pi, once per row
    return out.reshape(batch, q_heads, q_len, dim), lse.reshape(batch, q_heads, q_len)


def _tiles(tokens: int, tuning: DecodeTuning) -> int:
    """Tiles of ``tuning.block`` tokens that cover ``tokens`` (at least one, so an empty block still writes)."""
    return max(1, triton.cdiv(tokens, tuning.block))


def split_count(
    shape: tuple[int, int, int],
    tuning: DecodeTuning,
    device: torch.device,
    split: int | None = None,
) -> int:
    """Sequence ranges for codes of ``shape`` (batch, kv_heads, s): ``split`` checked, or the default that fills
    the device (``tuning.waves`` programs per SM)."""
    if split is None:
        split = default_split(shape[0], shape[1], _tiles(shape[2], tuning), device, tuning.waves)
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"split must be a positive integer, got {split!r}")
    return split


def plan_block(
    shape: tuple[int, int, int],
    codec_k: RotatedBlockCodec,
    codec_v: RotatedBlockCodec,
    rows: int,
    tuning: DecodeTuning,
    device: torch.device,
    split: int | None = None,
) -> tuple[mma_decode.MmaVariant | None, int]:
    """Which kernel reads a block of codes of ``shape`` (batch, kv_heads, s) — the variant of the CUDA mma
    kernel (:func:`.mma_decode.variant`), or None: the Triton kernel — and its split (``split`` checked, or
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
_PLANS: dict[tuple, tuple[mma_decode.MmaVariant | None, int]] = {}
_PLANS_LOCK = threading.Lock()


def _plan(shape, codec_k, codec_v, rows, tuning, device, split):
    """:func:`plan_block`, not remembered."""
    if not (
        tuning.mma
        and tuning.codebook_dtype == torch.float16
        and mma_decode.usable(codec_k, codec_v, codec_k.d, rows, device)
    ):
        return None, split_count(shape, tuning, device, split)
    kernel, default = mma_decode.filling_variant(
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


def side_constexprs(
    side: str, k: int, bits: int, dim: int, book: torch.Tensor, planes: int = 0
) -> dict[str, int]:
    """The decode kernel's compile-time constants for keys (``side="K"``) or values (``"V"``): block size k,
    index width, packed bytes per vector, bytes an index can straddle, ``planes`` (:func:`plane_chunk`) and the
    codebook's length (entries, or packed words for GATHER 2) padded to a power of two and real. The one
    statement of them, shared by the launcher and the offline compile check (:mod:`.offline_compile`)."""
    return {
        f"K_{side}": k, f"W_{side}": bits, f"NB_{side}": packed_bytes(dim // k, bits),
        f"SPAN_{side}": _span(bits), f"PL_{side}": planes,
        f"NK_{side}": triton.next_power_of_2(book.numel()), f"NK_{side}_REAL": book.numel(),
    }  # fmt: skip


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
    kernel: mma_decode.MmaVariant | None = None,
) -> None:
    """Run a decode kernel over one block of codes, writing its ``split`` partials at splits [offset, offset +
    split) of ``workspace`` (several blocks share one workspace, merged by one epilogue): the Triton kernel,
    or, given the CUDA kernel's variant ``kernel`` (from :func:`plan_block`), that kernel."""
    if kernel is not None:
        mma_decode.launch_mma_partials(
            q_rot, codes_k, codes_v, codec_k, codec_v, lengths, workspace, offset, split, kernel
        )
        return
    acc, row_max, row_sum = workspace
    batch, kv_heads, rows, dim = q_rot.shape
    s_kv, device = codes_k.shape[2], q_rot.device
    chunk = triton.cdiv(_tiles(s_kv, tuning), split) * tuning.block  # whole tiles per split
    _, book_k = codec_k.tensors(device, tuning.codebook_dtype)
    _, book_v = codec_v.tensors(device, tuning.codebook_dtype)
    kidx, vidx = codes_k.indices.contiguous(), codes_v.indices.contiguous()
    knorm, vnorm = codes_k.norms.contiguous(), codes_v.norms.contiguous()
    lens = torch.zeros(1, dtype=torch.int32, device=device) if lengths is None else lengths
    lens = lens.to(device=device, dtype=torch.int32).contiguous()
    gather = tuning.gather_mode(book_k, book_v)
    if gather == 2:
        book_k, book_v = packed_words(book_k), packed_words(book_v)
    with launch_device(device):
        _decode_split_kernel[(batch * kv_heads, split)](
            q_rot, kidx, knorm, vidx, vnorm, book_k, book_v, lens, acc, row_max, row_sum,
            s_kv, chunk, kv_heads, offset, acc.shape[2],
            kidx.stride(0), kidx.stride(1), knorm.stride(0), knorm.stride(1),
            vidx.stride(0), vidx.stride(1), vnorm.stride(0), vnorm.stride(1),
            ROWS=rows, ROWS_BLOCK=max(16, triton.next_power_of_2(rows)), D=dim, BLOCK=tuning.block,
            **side_constexprs("K", codec_k.k, codec_k.index_bits, dim, book_k, plane_chunk(codec_k)),
            **side_constexprs("V", codec_v.k, codec_v.index_bits, dim, book_v, plane_chunk(codec_v)),
            HAS_LENGTHS=lengths is not None, GATHER=gather,
            num_warps=tuning.num_warps, num_stages=tuning.num_stages,
        )  # fmt: skip
