"""Launcher of the CUDA decode kernel on FibQuant codes at 1.5 to 4 bits and TurboQuant's at 2, 3 and 4
(``cuda/mma_decode.cu``).

FibQuant at 2 bits (k = 4) and 4 bits (k = 2) per coordinate stores one byte per codeword (N = 256, arXiv
2605.11478), at 3 bits 6 bits per pair of coordinates (k = 2, N = 64); its fractional rates 1.5, 2.5 and 3.5
take 6, 5 and 7 bits per codeword of 4, 2 and 2 coordinates (head dim 128: :func:`whole_bytes`). TurboQuant's
scalar codes at 2, 3 and 4 bits are read as FibQuant's: 4, 2 or 2 coordinates' indices at once, one index into
their product table (:func:`gathered`). For those codes the CUDA kernel gathers codewords straight into
``mma.sync`` fragments from lane-private copies of the codebook in shared memory, where the Triton kernel of
:mod:`.triton_decode` spends ~16 instructions per coordinate moving them into place (docs/kernels.md). It writes the
same split partials into the same workspace, so the epilogue (:mod:`.epilogue`) and :func:`.merge.merge_splits`
take either. Keys that are 2- or 3-bit codes of a uniform grid (TurboQuant ``grid="uniform"``; at 3 bits in planes)
skip the codebook: their codes are the int8 operand of the score mma (:func:`affine_keys`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pyramidkv.codecs.rotated import RotatedBlockCodec, VectorCodes
from pyramidkv.errors import PyramidKVError
from pyramidkv.kernels.cuda_module import CudaKernel, compile_cubin, nvrtc_found

SOURCE = Path(__file__).with_name("cuda") / "mma_decode.cu"
KERNEL_NAME = "fibquant_mma_decode"
TILE = 16  # tokens per warp iteration (the kernel's TILE)
# (k, N) of the codewords it gathers: FibQuant at 2, 4 and 3 bits per coordinate (8- and 6-bit indices), and at
# 1.5, 2.5 and 3.5 (6-, 5- and 7-bit indices), where a lane's index bits are whole bytes (:func:`whole_bytes`)
CODES = {(4, 256), (2, 256), (2, 64), (4, 64), (2, 32), (2, 128)}
# keys of a uniform grid read as int8 (:func:`affine_keys`), by bits per code: the (k, N) of value codes whose index
# bytes per token are as many (d / 4 at 2 bits, 3d / 8 at 3), so the ring and the tiles are laid out alike
AFFINE_CODES = {2: (4, 256), 3: (2, 64)}
MAX_ROWS = 16  # query rows per KV head (G x q_len) one mma M dimension holds
# the kernel's row layouts by the most rows they hold: 4 (values pair two coordinates per register), 8, 16
ROW_CAPS = (4, 8, MAX_ROWS)
WARPS = (1, 2, 4, 8, 16)  # warps per block the launch bounds allow
# warps per block the default chooses from (:func:`filling_variant`), preferred first
FILL_WARPS = (8, 4)
# tiles in a warp's ring: one being read, at least one in flight
STAGES = range(2, 9)
# the default ring: more slots measured no faster at 2 and 3 bits, and 3 would cost a block per SM at 4 bits
# (docs/kernels.md, section 11)
RING = 2
# tiles a ring slot may hold (the default: default_slot_tiles); a slot's wait, barriers and commit serve them all
SLOT_TILES = (1, 2)
# bytes per codeword row of the kernel's table, in order of preference (docs/kernels.md, section 4)
ROW_SIZES = (256, 128)
BLOCK_RESERVED = 1024  # shared memory the driver keeps per resident block (sm_80 and later)
# tokens per head-dim coordinate a block reads while the epilogue merges one tile of splits (:func:`merge_split_cap`)
MERGE_TOKENS_PER_DIM = 14
# The ring slots' swizzle per (head dim, k, N, row cap): the slot row of tile tokens 0..7 (8..15 follow 8 rows on)
# and the XOR applied to the index of a row's CHUNK-byte copy chunk, per token. Found by an offline search over row
# permutations and chunk XORs linear in the token's bits, for the fewest shared-memory wavefronts of a warp's index
# reads per tile (tests/test_ring_banks.py counts them): 8 instead of 12 at 2 bits and 16 instead of 40 at 4 bits
# (d = 128). Applied only where it also measured faster (docs/kernels.md, sections 4 and 11): 2 bits with up to 4
# rows (with 8 rows the second value offset costs ~12 instructions, more than the saved wavefronts), 4 bits with up
# to 4 or 8 rows. Not at d = 64, where the swizzle (8 instead of 12 wavefronts) measured slower at 4 bits; none
# helps at 3 bits, or at 2 bits with d = 64 (6, the least there is).
NO_SWIZZLE = (tuple(range(8)), (0,) * 8)  # rows in token order, chunks in place
# 2 bits: a token's row has its bit 0 flipped by its bit 2; 4 bits: by its bit 1, and the chunk's bit 1 by its bit 2
_SWIZZLE_2BIT = ((0, 1, 2, 3, 5, 4, 7, 6), NO_SWIZZLE[1])
_SWIZZLE_4BIT = ((0, 1, 3, 2, 4, 5, 7, 6), (0, 0, 0, 0, 2, 2, 2, 2))
RING_SWIZZLE: dict[tuple[int, int, int, int], tuple[tuple[int, ...], tuple[int, ...]]] = {
    (128, 4, 256, 4): _SWIZZLE_2BIT,
    (128, 2, 256, 4): _SWIZZLE_4BIT,
    (128, 2, 256, 8): _SWIZZLE_4BIT,
}


def whole_bytes(dim: int, k: int, n: int) -> bool:
    """Whether a lane's share of one key's indices (D / 4k of them) and of one value's (D / 8k) fill whole bytes:
    each lane reads its own from a byte boundary of the token's packed indices. 8-bit indices always do; 5-, 6- and
    7-bit ones at head dim 128, and 6-bit ones of k = 2 at 64."""
    bits = n.bit_length() - 1
    return all(dim // (lanes * k) * bits % 8 == 0 for lanes in (4, 8))


def ring_divides(stages: int, slot_tiles: int) -> bool:
    """Whether a ring of ``stages`` tiles divides into at least two slots of ``slot_tiles``: one being read, one
    in flight."""
    return stages % slot_tiles == 0 and stages >= 2 * slot_tiles


def check_launch(
    warps: int | None, stages: int | None, names: tuple[str, str] = ("warps", "stages")
) -> None:
    """Raise naming ``names`` unless ``warps`` and ``stages`` (None: chosen per launch) are a launch the
    kernel takes."""
    if warps is not None and warps not in WARPS:
        raise PyramidKVError(f"{names[0]} must be one of {', '.join(map(str, WARPS))}, got {warps}")
    if stages is not None and stages not in STAGES:
        raise PyramidKVError(f"{names[1]} must be in {STAGES[0]}..{STAGES[-1]}, got {stages}")


@dataclass(frozen=True)
class MmaVariant:
    """The kernel's compile-time constants: head dim, codeword length k, the most query rows per KV head
    it holds (``ROW_CAPS``: up to 4 rows leave half of the value mma's columns to a second coordinate,
    docs/kernels.md section 4; 9-16 take a second n-tile), warps per block, whether keys and values share one
    codebook, the codebook's size N (2^index bits), the tiles (index bytes and norms) each warp's ring
    holds (cp.async), the bytes per codeword row of the table (256: an 8-bit index is its row's
    address byte; 128: half the shared memory), and whether the keys are codes of a uniform grid, read as int8
    with no codebook (:func:`affine_keys`: 2-bit codes with (k, N) = (4, 256), 3-bit planes with (2, 64))."""

    dim: int
    k: int
    rows: int
    warps: int = 8
    shared_book: bool = True
    n: int = 256
    stages: int = RING
    row_bytes: int = 256
    keys_affine: bool = False
    slot_tiles: int = 1

    def __post_init__(self) -> None:
        if self.dim not in (64, 128):
            raise PyramidKVError(f"dim must be 64 or 128, got {self.dim}")
        if self.k not in (2, 4):
            raise PyramidKVError(f"k must be 2 or 4, got {self.k}")
        if (self.k, self.n) not in CODES:
            raise PyramidKVError(f"(k, n) must be one of {sorted(CODES)}, got {(self.k, self.n)}")
        if not whole_bytes(self.dim, self.k, self.n):
            raise PyramidKVError(
                f"(k, n) = {(self.k, self.n)} at dim {self.dim}: a lane's index bits are not whole bytes"
            )
        if self.rows not in ROW_CAPS:
            raise PyramidKVError(f"rows must be one of {ROW_CAPS}, got {self.rows}")
        check_launch(self.warps, self.stages)
        if self.row_bytes not in ROW_SIZES:
            raise PyramidKVError(f"row_bytes must be one of {ROW_SIZES}, got {self.row_bytes}")
        if self.slot_tiles not in SLOT_TILES or not ring_divides(self.stages, self.slot_tiles):
            raise PyramidKVError(
                f"slot_tiles must be one of {SLOT_TILES} and divide stages into at least two slots, got "
                f"{self.slot_tiles} with stages={self.stages}"
            )
        if self.keys_affine and (self.k, self.n) not in AFFINE_CODES.values():
            raise PyramidKVError(
                f"keys_affine reads 2- or 3-bit codes beside values of (k, n) in {sorted(AFFINE_CODES.values())}, "
                f"got {(self.k, self.n)}"
            )

    @property
    def index_bytes(self) -> int:
        """Packed index bytes per token: D / k indices of log2(N) bits."""
        return self.dim // self.k * (self.n.bit_length() - 1) // 8

    @property
    def shared_bytes(self) -> int:
        """Dynamic shared memory: the table (N rows: the key codeword's lane copies, then the value codeword's
        in 256-byte rows, or a second table of 128-byte rows) and each warp's ring of ``stages`` slots (a tile's
        key and value index bytes and norms), or what the merge of the warps at the end of a block needs (it
        reuses them), whichever is larger."""
        slot = 2 * TILE * self.index_bytes + 4 * TILE
        tables = 2 if self.row_bytes == 128 and not self.shared_book else 1
        return max(tables * self.n * self.row_bytes + self.warps * self.stages * slot,
                   (2 * self.warps * MAX_ROWS + MAX_ROWS * self.dim) * 4)  # fmt: skip

    def blocks_per_sm(self, device: torch.device) -> int:
        """Blocks of this variant one SM of ``device`` holds at once (:func:`_blocks_per_sm`)."""
        return _blocks_per_sm(self, device)

    @property
    def swizzle(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ring slots' row permutation and chunk XORs (``RING_SWIZZLE``; none where it has no entry)."""
        return RING_SWIZZLE.get((self.dim, self.k, self.n, self.rows), NO_SWIZZLE)

    def source(self) -> str:
        """The CUDA source with this variant's constants defined."""
        perm, xor = self.swizzle
        defines = dict(
            D=self.dim, KC=self.k, W=self.n.bit_length() - 1, ROWS_CAP=self.rows, NW=self.warps,
            SHARED_BOOK=int(self.shared_book), STAGES=self.stages, ROW_BYTES=self.row_bytes,
            SWIZZLED=int((perm, xor) != NO_SWIZZLE), KEYS_AFFINE=int(self.keys_affine), TPS=self.slot_tiles,
            ROW_PERM=f"{sum(row << 3 * tok for tok, row in enumerate(perm)):#x}u",
            CHUNK_XOR=f"{sum(x << 2 * tok for tok, x in enumerate(xor)):#x}u",
        )  # fmt: skip
        head = "".join(f"#define {name} {value}\n" for name, value in defines.items())
        return head + SOURCE.read_text()


def gathered(codec: object) -> tuple[int, int, int] | None:
    """(k, N, group) of the codewords the kernel gathers for ``codec``'s codes, or None where it cannot read
    them: the codec's own (k, N) where that is in ``CODES`` (FibQuant at 1.5 to 4 bits, group 1), else
    ``group`` consecutive indices read as one index into their product table
    (:meth:`~pyramidkv.codecs.rotated.RotatedBlockCodec.grouped_codebook`) where that gives a (k, N) in
    ``CODES``: TurboQuant's scalar codes at 2 bits (4 coordinates per byte), 4 bits (2 per byte) and 3 bits
    (2 per 6 bits), so they run at FibQuant's speed instead of the Triton kernel's. Codes in planes are not a
    bit stream and group into no table (as keys they are read as int8: :func:`key_view`)."""
    if not isinstance(codec, RotatedBlockCodec) or codec.layout != "stream":
        return None
    if (codec.k, codec.n) in CODES:
        return codec.k, codec.n, 1
    if not codec.full_indices:
        return None
    for k, n in sorted(CODES):
        group = k // codec.k
        if k % codec.k == 0 and codec.n**group == n:
            return k, n, group
    return None


def affine_keys(codec: object) -> bool:
    """Whether the kernel reads ``codec``'s codes as keys with no codebook: codes of a uniform grid (TurboQuant
    ``grid="uniform"``), whose level step (c - (N - 1) / 2) is affine in the code c, so the codes are the int8
    operand of the score mma and the step and offset apply once per score: no key codebook, so none of the key
    gathers that are half of a codebook tile's (docs/kernels.md, section 2). 2-bit codes four to a byte of the
    stream; 3-bit codes in planes (:mod:`pyramidkv.codecs.planes`), whose registers cost two shifts and two
    masks where the stream's would cost a shift per code."""
    if (
        not isinstance(codec, RotatedBlockCodec)
        or codec.k != 1
        or getattr(codec, "step", None) is None
    ):
        return False
    return (codec.n, codec.layout) in ((4, "stream"), (8, "planes"))


def key_view(codec: object) -> tuple[int, int] | None:
    """The (k, N) of the variant that reads ``codec``'s codes as keys: ``AFFINE_CODES`` for keys read as int8
    (:func:`affine_keys`), else the (k, N) of :func:`gathered`; None where the kernel cannot read them."""
    if affine_keys(codec):
        return AFFINE_CODES[codec.n.bit_length() - 1]
    view = gathered(codec)
    return None if view is None else view[:2]


def tables(
    codec_k: object, codec_v: object, kernel: MmaVariant, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value codewords ``kernel`` gathers (:func:`gathered`), float16, as int32 words, the value
    table the key one where the variant shares one, and for keys read as int8 (``keys_affine``) their grid's
    step instead; raises, naming the codec, where its codes are not the (k, N) and head dim the variant was
    compiled for (:func:`key_view` for keys). The launch checks only that its plan (:func:`unsupported`,
    :func:`variant`) still fits the codes it is given."""
    value = gathered(codec_v)
    for name, codec, view in (
        ("key codec", codec_k, key_view(codec_k)),
        ("value codec", codec_v, value),
    ):
        if view is None or view[:2] != (kernel.k, kernel.n) or codec.d != kernel.dim:
            got = (
                "codes it cannot read"
                if view is None
                else f"(k, N) = {view[:2]} at head dim {codec.d}"
            )
            raise PyramidKVError(
                f"{name}: the kernel variant reads (k, N) = {(kernel.k, kernel.n)} at head dim {kernel.dim}, "
                f"got {got}"
            )
    book_v = codec_v.grouped_codebook(value[2], device, torch.float16).view(torch.int32)
    if kernel.keys_affine:  # the keys' grid step, the one number the kernel reads of their codec
        if not affine_keys(codec_k):
            raise PyramidKVError(
                "key codec: the kernel variant reads keys as int8 codes of a uniform grid"
            )
        return _grid_step(codec_k.step, device), book_v
    if kernel.shared_book:
        return book_v, book_v
    # keys not read as int8 passed the check through gathered(): their product table's group
    group = gathered(codec_k)[2]
    return codec_k.grouped_codebook(group, device, torch.float16).view(torch.int32), book_v


@functools.cache
def _grid_step(step: float, device: torch.device) -> torch.Tensor:
    """A uniform grid's step as the kernel's key table (one float32 as int32 bits on ``device``), made once: a
    copy from the host at every launch would cost a transfer, and none may run inside a CUDA graph's capture."""
    return torch.tensor([step], dtype=torch.float32, device=device).view(torch.int32)


def unsupported(codec_k: object, codec_v: object, dim: int, rows: int) -> str | None:
    """Why the kernel cannot read these codes, or None: it reads codes of a (k, N) in ``CODES`` (codewords of
    k = 4 or 2 coordinates, indices of 5 to 8 bits), FibQuant's or TurboQuant's grouped into one
    (:func:`gathered`), the same (k, N) for keys and values, at head dims 64 and 128 where a lane's index bits
    are whole bytes (:func:`whole_bytes`), for at most 16 query rows per KV head."""
    views = []
    for name, view in (("key codec", key_view(codec_k)), ("value codec", gathered(codec_v))):
        if view is None:
            return (
                f"{name}: reads codebooks with (k, N) in {sorted(CODES)}, scalar codes whose indices "
                "group into one (TurboQuant at 2, 3 and 4 bits), or keys of a uniform grid"
            )
        views.append(view[:2])
    if views[0] != views[1]:
        return f"keys and values must share k and N; got {views[0]} and {views[1]}"
    if dim not in (64, 128) or codec_k.d != dim or codec_v.d != dim:
        return f"head dim must be 64 or 128, got {dim}"
    if not whole_bytes(dim, *views[0]):
        return f"(k, N) = {views[0]} at head dim {dim}: a lane's index bits are not whole bytes (use head dim 128)"
    if rows > MAX_ROWS:
        return f"at most {MAX_ROWS} query rows per KV head (G x q_len), got {rows}"
    return None


def usable(codec_k: object, codec_v: object, dim: int, rows: int, device: torch.device) -> bool:
    """Whether the kernel runs here and reads these codes: a CUDA device with f16 ``mma.sync`` (compute
    capability 8.0 or later), NVRTC found, and codes :func:`unsupported` accepts."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    return unsupported(codec_k, codec_v, dim, rows) is None and nvrtc_found()


@functools.cache
def _blocks_per_sm(kernel: MmaVariant, device: torch.device) -> int:
    """Two blocks of 8 warps by registers (128 each, ``__launch_bounds__``; one block for 9-16 query rows), fewer
    where the shared memory (each block's table and rings, and what the driver reserves) runs out first: 0
    where not even one block fits."""
    by_registers = 1 if kernel.rows > 8 else max(1, 16 // kernel.warps)
    props = torch.cuda.get_device_properties(device)
    per_sm = getattr(props, "shared_memory_per_multiprocessor", 0) or 228 * 1024
    per_block = kernel.shared_bytes + BLOCK_RESERVED
    return min(by_registers, per_sm // per_block)


def variant(
    codec_k: RotatedBlockCodec,
    codec_v: RotatedBlockCodec,
    rows: int,
    warps: int,
    stages: int | None,
    device: torch.device,
    slot_tiles: int | None = None,
) -> MmaVariant:
    """The kernel variant that reads these codes: 256-byte table rows, or 128-byte rows where those keep more
    blocks per SM (an SM with less shared memory than the H200's, e.g. an A100's), with a ring of ``stages``
    tiles in slots of ``slot_tiles`` (None: :func:`default_slot_tiles`; the ring then ``RING`` slots). 256-byte
    rows need no shift or add to address a codeword (an 8-bit index is the row's address byte) and measured
    faster than 128-byte ones at 3 bits, the same at 2 and 4 (docs/kernels.md, section 4)."""
    cap = next(cap for cap in ROW_CAPS if rows <= cap)
    k, n = key_view(codec_k)
    affine = affine_keys(codec_k)
    tiles = slot_tiles
    if tiles is None:  # the default, where the ring asked for divides into two slots of it
        tiles = default_slot_tiles(affine, codec_k.d)
        tiles = tiles if stages is None or ring_divides(stages, tiles) else 1
    key = (codec_k.d, k, cap, warps, same_codebook(codec_k, codec_v), n)
    return _variant(key, RING * tiles if stages is None else stages, device, affine, tiles)


def default_slot_tiles(keys_affine: bool, dim: int) -> int:
    """Tiles per ring slot by default: 2 for keys of a uniform grid and for codebook keys at head dim 64, where
    the slot's wait, barriers and commit serving 32 tokens measured faster; 1 for codebook keys at head dim 128,
    where two-tile slots measured slower (docs/kernels.md, sections 4 and 11)."""
    return 2 if keys_affine or dim == 64 else 1


def filling_variant(
    shape: tuple[int, int, int],
    codec_k: RotatedBlockCodec,
    codec_v: RotatedBlockCodec,
    rows: int,
    warps: int | None,
    stages: int | None,
    device: torch.device,
    slot_tiles: int | None = None,
) -> tuple[MmaVariant, int]:
    """The :func:`variant` that reads codes of ``shape`` (batch, kv_heads, s) and its default split
    (:func:`mma_split`): with ``warps`` per block, or (None) of ``FILL_WARPS`` warps the one whose split fills
    the largest share of the SMs' block slots in its last wave, the first on a tie. Blocks of 8 warps leave slots
    empty where the (sequence, KV head) rows do not divide them: 9/3 x 64 at batch 32 (96 rows) runs 192 blocks
    on 264 slots (73%); 4-warp blocks run 384 on 396 or 512 on 528, and measured faster (docs/kernels.md,
    section 3)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    best, best_fill = None, -1.0
    for w in FILL_WARPS if warps is None else (warps,):
        kernel = variant(codec_k, codec_v, rows, w, stages, device, slot_tiles)
        split = mma_split(shape, device, kernel)
        units = sms * kernel.blocks_per_sm(device)
        blocks = split * shape[0] * shape[1]
        fill = blocks / (math.ceil(blocks / units) * units) if units else 0.0
        if fill > best_fill:
            best, best_fill = (kernel, split), fill
    return best


@functools.cache
def _variant(
    key: tuple, stages: int, device: torch.device, keys_affine: bool, slot_tiles: int
) -> MmaVariant:
    """:func:`variant` for the constants ``key`` (dim, k, rows, warps, shared_book, n), once per process."""
    options = [MmaVariant(*key, stages, row, keys_affine, slot_tiles) for row in ROW_SIZES]
    most = max(kernel.blocks_per_sm(device) for kernel in options)
    if most == 0:
        raise PyramidKVError(
            f"mma_warps={key[3]} with mma_stages={stages} need more shared memory than an SM of {device} has "
            f"({options[-1].shared_bytes} bytes at least); take fewer warps or stages"
        )
    return next(kernel for kernel in options if kernel.blocks_per_sm(device) == most)


def same_codebook(codec_k: RotatedBlockCodec, codec_v: RotatedBlockCodec) -> bool:
    """Whether keys and values use one codebook (the same ``book_key``: one codec at one rate)."""
    return codec_k.book_key == codec_v.book_key


@functools.cache
def compiled(variant: MmaVariant, arch: str) -> bytes:
    """The variant's cubin for ``arch`` (``"sm_90"``), compiled once per process."""
    return compile_cubin(variant.source(), KERNEL_NAME, arch, ["-DNDEBUG"])


@functools.cache
def _kernel(variant: MmaVariant, device: torch.device) -> CudaKernel:
    major, minor = torch.cuda.get_device_capability(device)
    cubin = compiled(variant, f"sm_{major}{minor}")
    return CudaKernel(cubin, KERNEL_NAME, device, variant.shared_bytes)


def mma_split(shape: tuple[int, int, int], device: torch.device, kernel: MmaVariant) -> int:
    """Sequence ranges for codes of ``shape`` (batch, kv_heads, s) read by ``kernel``: the most blocks that
    still run in one wave (:meth:`MmaVariant.blocks_per_sm` per SM), so no second wave runs a few blocks alone
    (a second wave costs more than the extra split saves); at least one tile per warp in each block. Where
    :func:`merge_split_cap` is less (small batches: past it the epilogue's merge of the splits costs more than
    the kernel saves), that, and no more blocks than SMs, since a few SMs running two blocks set the kernel's
    time (docs/kernels.md, section 3; ``benchmarks/decode_split_time.py``)."""
    split = one_wave_split(shape, device, kernel)
    cap = merge_split_cap(shape[2], kernel.dim)
    if cap < split:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(cap, sms // (shape[0] * shape[1])))
    return split


def one_wave_split(shape: tuple[int, int, int], device: torch.device, kernel: MmaVariant) -> int:
    """The most sequence ranges of codes of ``shape`` (batch, kv_heads, s) whose blocks ``kernel`` runs in one
    wave on ``device``, with at least one tile per warp in each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    units = sms * kernel.blocks_per_sm(device)
    return max(1, min(math.ceil(shape[2] / (TILE * kernel.warps)), units // (shape[0] * shape[1])))


def merge_split_cap(tokens: int, dim: int) -> int:
    """The split of ``tokens`` codes per (sequence, KV head) that minimises the decode kernel plus the epilogue
    where the kernel's blocks all run at once (small batches).

    The epilogue (:mod:`.epilogue`) merges the splits ``SPLIT_BLOCK`` (16) at a time, at about the same cost
    for 2 splits as for 16, and a fixed cost for each further tile of 16 (figures: benchmarks/README.md). A
    block reads its tokens at ~TOKEN_NS each, so the kernel takes ~TOKEN_NS tokens / split: a k-th tile pays
    while the kernel time it saves, tokens TOKEN_NS (1 / (16 (k - 1)) - 1 / (16 k)), is more than a tile's
    merge, i.e. while (k - 1) k < tokens / (16 M d), where M d tokens take a block as long as a tile's merge
    (``MERGE_TOKENS_PER_DIM``). M = 14 fits the sweep of ``benchmarks/decode_split_time.py`` (9/3 x 64 at
    batch 1: least at 16, 32 and 44 splits, the defaults, for 8k, 32k and 128k tokens; it is ~10 by the
    per-token and per-tile costs alone, but the kernel's time per block does not fall as 1 / split: each block
    also fills its 64 KiB codebook table).
    """
    from pyramidkv.kernels.epilogue import SPLIT_BLOCK

    tiles = 1
    while tiles * (tiles + 1) < tokens / (SPLIT_BLOCK * MERGE_TOKENS_PER_DIM * dim):
        tiles += 1
    return SPLIT_BLOCK * tiles


def _aligned(codes: VectorCodes) -> VectorCodes:
    """Codes whose index rows the kernel's async copies can read (rows of contiguous tokens starting on 16
    bytes, on 8 for rows of 24-byte tokens: the kernel's CHUNK), as they are or as a fresh copy (an odd view,
    e.g. a slice of a wider tensor)."""
    idx = codes.indices
    chunk = 8 if idx.shape[-1] % 16 else 16
    dense = idx.stride(-1) == 1 and idx.stride(-2) == idx.shape[-1]
    if dense and all(a % chunk == 0 for a in (idx.data_ptr(), *idx.stride()[:2])):
        return codes
    return replace(codes, indices=idx.clone(memory_format=torch.contiguous_format))


def launch_mma_partials(
    q_rot: torch.Tensor,
    codes_k: VectorCodes,
    codes_v: VectorCodes,
    codec_k: RotatedBlockCodec,
    codec_v: RotatedBlockCodec,
    lengths: torch.Tensor | None,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    offset: int,
    split: int,
    kernel: MmaVariant,
) -> None:
    """The CUDA kernel over one block of codes: its ``split`` partials at splits [offset, offset + split) of
    ``workspace``, as :func:`.dispatch.launch_partials` writes them. ``q_rot`` (batch, kv_heads, rows,
    d) float16 from :func:`.plan.rotate_query`; ``kernel``: :func:`variant` for these codecs and rows
    (:func:`.plan.plan_block` chose it)."""
    acc, row_max, row_sum = workspace
    batch, kv_heads, rows, dim = q_rot.shape
    if dim != kernel.dim or rows > kernel.rows:
        raise PyramidKVError(
            f"q_rot: the kernel variant takes head dim {kernel.dim} and up to {kernel.rows} query rows per KV "
            f"head, got {dim} and {rows}"
        )
    if q_rot.dtype != torch.float16 or not q_rot.is_contiguous():
        raise PyramidKVError(f"q_rot must be contiguous float16, got {q_rot.dtype}")
    device = q_rot.device
    book_k, book_v = tables(codec_k, codec_v, kernel, device)
    codes_k, codes_v = _aligned(codes_k), _aligned(codes_v)
    s_kv = codes_k.shape[2]
    chunk = math.ceil(math.ceil(s_kv / split) / TILE) * TILE
    lens = None if lengths is None else lengths.to(device=device, dtype=torch.int32).contiguous()
    ki, kn, vi, vn = codes_k.indices, codes_k.norms, codes_v.indices, codes_v.norms
    _kernel(kernel, device)(
        (batch * kv_heads, split), 32 * kernel.warps,
        q_rot, ki, kn, vi, vn, book_k, book_v, lens, acc, row_max, row_sum,
        s_kv, chunk, kv_heads, offset, acc.shape[2], rows,
        ki.stride(0), ki.stride(1), kn.stride(0), kn.stride(1),
        vi.stride(0), vi.stride(1), vn.stride(0), vn.stride(1),
    )  # fmt: skip
