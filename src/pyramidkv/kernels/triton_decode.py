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
TurboQuant all go through this one kernel. docs/kernels.md (sections 1 and 5) gives the byte and operation
counts.
"""

from __future__ import annotations

import torch

from pyramidkv.codecs.packing import packed_bytes
from pyramidkv.codecs.rotated import RotatedBlockCodec, VectorCodes
from pyramidkv.kernels.launch import launch_device
from pyramidkv.kernels.plan import DecodeTuning, packed_words, plane_chunk, tiles

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU environment without triton; callers use the torch reference there
    triton = None


# lengths that change with every flush of the window: not specialized (see epilogue.RUN_LENGTHS)
RUN_LENGTHS = ("s_kv", "chunk", "split_offset", "split_total")


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
        the flat codebook, one entry per coordinate; 2 from the packed codewords (:func:`.plan.packed_words`), one
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


def _span(bits: int) -> int:
    """Bytes an index of ``bits`` bits can straddle in the packed stream, over every bit offset it takes."""
    return max((j * bits % 8 + bits + 7) // 8 for j in range(8))


def side_constexprs(
    side: str, k: int, bits: int, dim: int, book: torch.Tensor, planes: int = 0
) -> dict[str, int]:
    """The decode kernel's compile-time constants for keys (``side="K"``) or values (``"V"``): block size k,
    index width, packed bytes per vector, bytes an index can straddle, ``planes`` (:func:`.plan.plane_chunk`) and the
    codebook's length (entries, or packed words for GATHER 2) padded to a power of two and real. The one
    statement of them, shared by the launcher and the offline compile check (``tools/offline_compile.py``)."""
    return {
        f"K_{side}": k, f"W_{side}": bits, f"NB_{side}": packed_bytes(dim // k, bits),
        f"SPAN_{side}": _span(bits), f"PL_{side}": planes,
        f"NK_{side}": triton.next_power_of_2(book.numel()), f"NK_{side}_REAL": book.numel(),
    }  # fmt: skip


def launch_triton_partials(
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
) -> None:
    """Run the Triton decode kernel over one block of codes, writing its ``split`` partials at splits
    [offset, offset + split) of ``workspace`` (:func:`pyramidkv.kernels.dispatch.launch_partials`)."""
    acc, row_max, row_sum = workspace
    batch, kv_heads, rows, dim = q_rot.shape
    s_kv, device = codes_k.shape[2], q_rot.device
    chunk = triton.cdiv(tiles(s_kv, tuning), split) * tuning.block  # whole tiles per split
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
