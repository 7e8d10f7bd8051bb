"""Fused encode of rotated-block codes (FibQuant, TurboQuant) in Triton: normalise, rotate, nearest codeword.

The torch encoder (:meth:`pyramidkv.codecs.rotated.RotatedBlockCodec.encode`) writes the rotated vectors
and a (points x codewords) score matrix to memory; here one program takes a tile of vectors, keeps them in
registers, rotates them with one ``tl.dot`` against Pi^T, and scans the N codewords once, keeping for each
block of k coordinates the best score 2 <u_m, c_n> - ||c_n||^2 (the nearest codeword, as in
:func:`pyramidkv.codecs.lloyd.nearest_codeword`). Used for the prompt at prefill and for every flush of the
fp16 recent window, so the cache's write path never leaves the GPU's registers until the codes are done.
8-bit indices are stored as bytes by the kernels. Other widths: the kernel of one vector per program (a decode
step's) packs them itself in the codec's layout (:func:`_packed`); after the kernel of tiles (prefill, flushes)
torch packs them (:meth:`~pyramidkv.codecs.rotated.RotatedBlockCodec.pack`).
"""

from __future__ import annotations

import torch

from pyramidkv.codecs.base import FP16_MAX, check_input
from pyramidkv.codecs.packing import packed_bytes
from pyramidkv.codecs.rotated import RotatedBlockCodec, VectorCodes
from pyramidkv.errors import PyramidKVError
from pyramidkv.kernels.launch import launch_device
from pyramidkv.kernels.plan import check_codec, plane_chunk

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU environment without triton; codecs encode in torch there
    triton = None
else:
    from pyramidkv.kernels.triton_decode import _plane_bits

BLOCK_T = 16  # vectors per program (tl.dot needs >= 16 rows)
# vectors per call, prefill or flush: not specialized (see epilogue.RUN_LENGTHS)
RUN_LENGTHS = ("count",)

if triton is not None:

    @triton.jit(do_not_specialize=RUN_LENGTHS)
    def _encode_kernel(
        x_ptr, rot_t_ptr, cb_ptr, cb_sq_ptr, idx_ptr, norm_ptr, count,
        D: tl.constexpr, K: tl.constexpr, N: tl.constexpr, BYTE_INDEX: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Norms (fp16) and nearest-codeword indices (BLOCK vectors x D/K blocks) of BLOCK rows of x."""
        t_off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        t_mask = t_off < count
        d_off = tl.arange(0, D)
        x = tl.load(x_ptr + t_off[:, None] * D + d_off[None, :], mask=t_mask[:, None], other=0.0)
        x = x.to(tl.float32)
        nu = tl.sqrt(tl.sum(x * x, axis=1))
        rot_t = tl.load(rot_t_ptr + d_off[:, None] * D + d_off[None, :])
        unit = tl.dot(x, rot_t, input_precision="ieee") / tl.maximum(nu, 1e-30)[:, None]
        blocks = tl.reshape(unit, (BLOCK, D // K, K))
        entry = tl.arange(0, K)
        best = tl.full([BLOCK, D // K], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK, D // K], tl.int32)
        for n in range(N):
            word = tl.load(cb_ptr + n * K + entry)
            score = 2.0 * tl.sum(blocks * word[None, None, :], axis=2) - tl.load(cb_sq_ptr + n)
            better = score > best  # strict: the first of equal codewords wins, as argmin does
            best = tl.where(better, score, best)
            best_idx = tl.where(better, n, best_idx)
        m_off = tl.arange(0, D // K)
        out = idx_ptr + t_off[:, None] * (D // K) + m_off[None, :]
        if BYTE_INDEX:
            tl.store(out, best_idx.to(tl.uint8), mask=t_mask[:, None])
        else:
            tl.store(out, best_idx.to(tl.int16), mask=t_mask[:, None])
        tl.store(norm_ptr + t_off, nu.to(tl.float16), mask=t_mask)

    @triton.jit
    def _packed(idx, M: tl.constexpr, W: tl.constexpr, NB: tl.constexpr, PLANES: tl.constexpr):
        """The NB bytes (a power of two, past the vector's own: zeros) that the M W-bit indices ``idx`` pack into:
        the little-endian bit stream of :mod:`pyramidkv.codecs.packing` (index m at bit m W, over up to three
        bytes), or with PLANES > 0 the planes of 3-bit codes (:mod:`pyramidkv.codecs.planes`). Each byte sums the
        parts that land in it, an (NB, M) tile: no part of two indices shares a bit, so the sum is their OR."""
        byte = tl.arange(0, NB)[:, None]
        m = tl.arange(0, M)
        if PLANES > 0:
            low_at, low_shift, high_at, high_shift = _plane_bits(m, PLANES)
            parts = tl.where(byte == low_at[None, :], ((idx & 3) << low_shift)[None, :], 0)
            parts += tl.where(
                byte == high_at[None, :], (((idx >> 2) & 1) << high_shift)[None, :], 0
            )
        else:
            at = (m * W) // 8
            value = (idx << ((m * W) % 8))[None, :]
            parts = tl.where(byte == at[None, :], value & 255, 0)
            parts += tl.where(byte == at[None, :] + 1, (value >> 8) & 255, 0)
            parts += tl.where(byte == at[None, :] + 2, value >> 16, 0)
        return tl.sum(parts, axis=1)

    @triton.jit
    def _encode_one_kernel(
        x_ptr, rot_t_ptr, cb_ptr, cb_sq_ptr, idx_ptr, norm_ptr,
        D: tl.constexpr, K: tl.constexpr, N: tl.constexpr, BYTE_INDEX: tl.constexpr,
        W: tl.constexpr, NB: tl.constexpr, NB_P2: tl.constexpr, PLANES: tl.constexpr,
    ):  # fmt: skip
        """One vector per program, scored against every codeword at once (an (N, D/K) tile): for a decode
        step's few vectors, where _encode_kernel is one program whose N-step scan is its whole time. Stores
        the packed bytes (NB per vector) in the codec's layout, so a step spends no operations packing them
        (:func:`_packed`)."""
        row = tl.program_id(0).to(tl.int64)
        d_off = tl.arange(0, D)
        x = tl.load(x_ptr + row * D + d_off).to(tl.float32)
        nu = tl.sqrt(tl.sum(x * x, axis=0))
        rot_t = tl.load(rot_t_ptr + d_off[:, None] * D + d_off[None, :])
        unit = tl.sum(x[:, None] * rot_t, axis=0) / tl.maximum(nu, 1e-30)
        blocks = tl.reshape(unit, (D // K, K))
        entry = tl.arange(0, K)
        n_off = tl.arange(0, N)
        dot = tl.zeros([N, D // K], tl.float32)
        for k in tl.static_range(K):
            # coordinate k of every block
            u_k = tl.sum(tl.where(entry[None, :] == k, blocks, 0.0), axis=1)
            dot += tl.load(cb_ptr + n_off * K + k)[:, None] * u_k[None, :]
        score = 2.0 * dot - tl.load(cb_sq_ptr + n_off)[:, None]
        # the first of equal codewords, as argmin
        best_idx = tl.argmax(score, axis=0, tie_break_left=True)
        if BYTE_INDEX:
            tl.store(idx_ptr + row * (D // K) + tl.arange(0, D // K), best_idx.to(tl.uint8))
        else:
            packed = _packed(best_idx.to(tl.int32), D // K, W, NB_P2, PLANES)
            b_off = tl.arange(0, NB_P2)
            tl.store(idx_ptr + row * NB + b_off, packed.to(tl.uint8), mask=b_off < NB)
        tl.store(norm_ptr + row, nu.to(tl.float16))


def encode_tables(codec: RotatedBlockCodec, device: torch.device) -> tuple[torch.Tensor, ...]:
    """What the encode kernel reads besides the vectors, in float32: Pi^T, the codebook and its squared
    norms. A caller encoding every step (the static cache) builds them once."""
    rotation, codebook = codec.tensors(device, torch.float32)
    return rotation.T.contiguous(), codebook, (codebook * codebook).sum(-1)


def launch_encode(
    codec: RotatedBlockCodec,
    flat: torch.Tensor,
    tables: tuple[torch.Tensor, ...],
    indices: torch.Tensor,
    norms: torch.Tensor,
    few: bool = False,
) -> None:
    """One launch of the encode kernel: ``flat`` (n, d) contiguous vectors into ``indices`` and ``norms`` (n,)
    float16 (:func:`encode_buffers`). ``few``: one program per vector scoring every codeword at once (a decode
    step's handful of vectors; for many, the tiles of 16 vectors scanning the codewords one by one move less),
    which writes the codes packed, (n, bytes) uint8 in the codec's layout; else (n, blocks) indices, uint8 for
    8-bit ones, else int16. No checks and no host reads (a norm beyond fp16 is stored as inf), so a CUDA graph
    can hold it; :func:`fused_encode` checks."""
    count = flat.shape[0]
    if not count:
        return
    constants = dict(D=codec.d, K=codec.k, N=codec.n, BYTE_INDEX=codec.index_bits == 8)
    with launch_device(flat.device):
        if few:
            nbytes = packed_bytes(codec.blocks, codec.index_bits)
            _encode_one_kernel[(count,)](
                flat, *tables, indices, norms, **constants, W=codec.index_bits, NB=nbytes,
                NB_P2=triton.next_power_of_2(nbytes), PLANES=plane_chunk(codec), num_warps=8,
            )  # fmt: skip
        else:
            _encode_kernel[(triton.cdiv(count, BLOCK_T),)](
                flat, *tables, indices, norms, count, **constants, BLOCK=BLOCK_T
            )


def encode_buffers(codec: RotatedBlockCodec, count: int, device: torch.device, few: bool = False):
    """Empty (indices, norms) for :func:`launch_encode` of ``count`` vectors with ``few`` as given: the packed
    bytes, or the indices."""
    if few or codec.index_bits == 8:
        width = packed_bytes(codec.blocks, codec.index_bits)
        indices = torch.empty(count, width, dtype=torch.uint8, device=device)
    else:
        indices = torch.empty(count, codec.blocks, dtype=torch.int16, device=device)
    return indices, torch.empty(count, dtype=torch.float16, device=device)


def fused_encode(
    codec: RotatedBlockCodec, x: torch.Tensor, few: bool = False, name: str = "x"
) -> VectorCodes:
    """Codes of ``x[..., d]`` equal to ``codec.encode(x)`` (up to ties at a cell border), from one kernel
    (``few``: :func:`launch_encode`'s kernel for a handful of vectors); ``name`` names ``x`` in an error."""
    if triton is None:
        raise RuntimeError("fused_encode needs triton; use codec.encode instead")
    check_codec("codec", codec, codec.d)
    x = check_input(x, codec.d, name)
    flat = x.reshape(-1, codec.d).contiguous()
    indices, norms = encode_buffers(codec, flat.shape[0], x.device, few)
    launch_encode(codec, flat, encode_tables(codec, x.device), indices, norms, few)
    if bool(torch.isinf(norms).any()):
        raise PyramidKVError(
            f"x has a vector whose norm is beyond the fp16 range ({FP16_MAX:g}) its norm is stored in; "
            "scale the input down"
        )
    packed = indices if few or codec.index_bits == 8 else codec.pack(indices)
    lead = x.shape[:-1]
    return VectorCodes(
        dtype=x.dtype, indices=packed.reshape(*lead, packed.shape[-1]), norms=norms.reshape(lead)
    )
