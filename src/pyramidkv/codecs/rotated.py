"""Normalise, rotate, quantize blocks: the engine shared by FibQuant and TurboQuant-mse.

For x in R^d (arXiv 2605.11478, Sec. 3): store nu = ||x|| in fp16; rotate u = Pi x / nu with the shared
Haar matrix Pi; split u into d/k blocks of k coordinates and store, for each, the index of the nearest of N
codewords of the shared codebook, bit-packed. Decode: codewords -> concatenate -> Pi^T -> times nu.
TurboQuant-mse (arXiv 2504.19874) is the case k = 1, N = 2^b.

Attention on codes needs only what this class exposes: ``rotation``, ``codebook``, ``unpack`` and the
``norms`` of the codes, since q.x_hat = nu * sum_m <(Pi q)_m, c_{idx_m}>.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyramidkv.checks import check_int
from pyramidkv.codecs.base import FP16_MAX, Codec, Codes, check_input
from pyramidkv.codecs.lloyd import nearest_codeword, score_budget
from pyramidkv.codecs.packing import pack_bits, packed_bytes, unpack_bits
from pyramidkv.codecs.planes import pack_planes, unpack_planes
from pyramidkv.codecs.rotation import haar_rotation
from pyramidkv.codecs.store import load_codebook
from pyramidkv.errors import PyramidKVError


@dataclass(frozen=True)
class VectorCodes(Codes):
    """Codes of normalise-rotate-quantize: ``indices uint8[..., bytes]`` (bit-packed), ``norms fp16[...]``."""

    indices: torch.Tensor
    norms: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """Leading shape of the encoded tensor (without its last dimension d)."""
        return tuple(self.norms.shape)


@functools.lru_cache(maxsize=128)
def _shared_codebook(d: int, k: int, n: int, seed: int) -> torch.Tensor:
    """In-memory layer over the disk cache: one codebook per process and key."""
    return torch.from_numpy(load_codebook(d, k, n, seed))


# device copies of the Haar rotations, one per (d, seed, device, dtype): every codec of one head dim and seed
# (the rates of a planned layer, keys and values) rotates with the same matrix, held once
_ROTATIONS: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}


# how a vector's indices lie in its bytes: one little-endian bit stream (.packing), or 3-bit codes in planes (.planes)
LAYOUTS = ("stream", "planes")


class RotatedBlockCodec(Codec):
    """Base of :class:`FibQuant` and :class:`TurboQuant`; subclasses provide ``d, k, n, seed`` (and may set
    ``layout``, one of ``LAYOUTS``) and call ``_setup``."""

    d: int
    k: int
    n: int
    seed: int
    layout: str = "stream"

    def _setup(self, codebook: torch.Tensor | None = None) -> None:
        """Take ``codebook`` (N, k) float64, or load (or build once) the shared one of (d, k, N, seed), and the
        rotation; device copies are made on first use."""
        self._codebook64 = (
            _shared_codebook(self.d, self.k, self.n, self.seed) if codebook is None else codebook
        )
        self._rotation64 = haar_rotation(self.d, self.seed)
        self._on_device: dict[
            tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]
        ] = {}
        self._grouped: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def book_key(self) -> tuple:
        """What identifies the codebook and the rotation: two codecs with the same key decode codes alike."""
        return (type(self), self.d, self.k, self.n, self.seed)

    @property
    def blocks(self) -> int:
        """Indices per vector: d / k."""
        return self.d // self.k

    @property
    def index_bits(self) -> int:
        """Bits of one packed index: ceil(log2 N)."""
        return max(1, math.ceil(math.log2(self.n)))

    @property
    def full_indices(self) -> bool:
        """Whether every ``index_bits``-bit pattern is a codeword's index (N = 2^index_bits): then any run of
        packed bits is a valid index, read alone or several at once (:meth:`grouped_codebook`)."""
        return self.n == 1 << self.index_bits

    @property
    def rate(self) -> float:
        """Nominal rate log2(N) / k bits per coordinate (the paper's b, without the norm)."""
        return math.log2(self.n) / self.k

    @property
    def codebook(self) -> torch.Tensor:
        """The shared codebook ``(N, k)``, float32 on the CPU."""
        return self._codebook64.float()

    @property
    def rotation(self) -> torch.Tensor:
        """The shared Haar rotation Pi ``(d, d)``, float32 on the CPU; ``u = x @ Pi.T``."""
        return self._rotation64.float()

    def tensors(
        self, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rotation, codebook)`` on ``device`` in ``dtype``, copied once and cached per device and dtype; the
        rotation is one tensor for every codec of the same ``(d, seed)``."""
        key = (torch.device(device), dtype)
        if key not in self._on_device:
            shared = (self.d, self.seed, *key)
            if shared not in _ROTATIONS:
                _ROTATIONS[shared] = self._rotation64.to(*key)
            self._on_device[key] = (_ROTATIONS[shared], self._codebook64.to(*key))
        return self._on_device[key]

    def grouped_codebook(
        self, group: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The codebook of ``group`` consecutive blocks read as one, ``(N^group, group k)``: entry p holds the
        codewords ``(p >> j index_bits) & (N - 1)``, j = 0 .. group - 1, side by side (a product quantizer's
        table, Jegou et al. 2011). Cached per group, device and dtype.

        The packed indices of a vector are one little-endian bit stream (:mod:`.packing`), so where N is
        2^index_bits the indices of blocks m group .. (m + 1) group - 1 are exactly the bits of one index of
        group index_bits bits into this table. That is how the CUDA decode kernel, which gathers codewords of
        2 or 4 coordinates by 5- to 8-bit indices, reads TurboQuant's scalar codes: at 2 bits four coordinates
        per byte, at 4 bits two per byte, at 3 bits two per 6 bits (:mod:`pyramidkv.kernels.cuda_decode`)."""
        check_int("group", group, 1)
        if group > 1 and not self.full_indices:
            raise PyramidKVError(
                f"group: indices of N = {self.n} codewords (not a power of two) cannot be read {group} at once"
            )
        if group > 1 and self.layout != "stream":
            raise PyramidKVError(
                f"group: codes in {self.layout} are not a bit stream, so not read {group} at once"
            )
        key = (group, torch.device(device), dtype)
        if key not in self._grouped:
            book = self.tensors(device, dtype)[1]
            entry = torch.arange(self.n**group, device=book.device)
            parts = [book[(entry >> j * self.index_bits) & (self.n - 1)] for j in range(group)]
            self._grouped[key] = torch.cat(parts, dim=1)
        return self._grouped[key]

    def bits_per_coordinate(self, include_norm: bool = True) -> float:
        """Stored bits per coordinate: packed index bytes per vector (+ the fp16 norm) over d."""
        bits = 8 * packed_bytes(self.blocks, self.index_bits) + (16 if include_norm else 0)
        return bits / self.d

    def encode(self, x: torch.Tensor, name: str = "x") -> VectorCodes:
        """Quantize ``x[..., d]`` (fp32, fp16, bf16 or fp64; CPU or CUDA) into packed codes on x's device;
        ``name`` names ``x`` in an error."""
        x = check_input(x, self.d, name)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        rotation, codebook = self.tensors(x.device, compute)
        flat = x.reshape(-1, self.d)
        nbytes = packed_bytes(self.blocks, self.index_bits)
        indices = torch.empty(flat.shape[0], nbytes, dtype=torch.uint8, device=x.device)
        norms = torch.empty(flat.shape[0], dtype=torch.float16, device=x.device)
        # rows per chunk: bounds the score matrix of the nearest-codeword search, and all temporaries
        rows = max(1, score_budget(x.device) // (self.blocks * self.n))
        for start in range(0, flat.shape[0], rows):
            nu, nearest = self.quantize(flat[start : start + rows].to(compute), rotation, codebook)
            stored = nu.to(torch.float16)
            if bool(torch.isinf(stored).any()):
                raise PyramidKVError(
                    f"x has a vector of norm {float(nu.max()):.4g}, beyond the fp16 range ({FP16_MAX:g}) "
                    "its norm is stored in; scale the input down"
                )
            indices[start : start + rows] = self.pack(nearest)
            norms[start : start + rows] = stored
        lead = x.shape[:-1]
        return VectorCodes(
            dtype=x.dtype, indices=indices.reshape(*lead, nbytes), norms=norms.reshape(lead)
        )

    def quantize(
        self, flat: torch.Tensor, rotation: torch.Tensor, codebook: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The arithmetic of :meth:`encode` on (P, d) rows in the compute dtype: their norms nu (P,) and the
        nearest-codeword index of each block of the rotated unit vectors, (P, d/k) int64. No checks and no
        host reads, so a CUDA graph can capture it (:mod:`pyramidkv.static.coded`)."""
        nu = torch.linalg.vector_norm(flat, dim=-1)
        unit = flat / nu.clamp_min(torch.finfo(flat.dtype).tiny).unsqueeze(-1)
        points = (unit @ rotation.T).reshape(-1, self.k)
        return nu, nearest_codeword(points, codebook).reshape(-1, self.blocks)

    def pack(self, indices: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Integer ``indices[..., d/k]`` as the bytes of this codec's ``layout``, ``uint8[..., bytes]``;
        ``check=False`` skips the range check's host read (CUDA graphs: :mod:`pyramidkv.static.coded`)."""
        if self.layout == "planes":
            return pack_planes(indices, self.d, check)
        return pack_bits(indices, self.index_bits, check)

    def unpack(self, codes: VectorCodes) -> torch.Tensor:
        """Codebook indices ``int64[..., d/k]`` of the codes."""
        if not isinstance(codes, VectorCodes):
            raise TypeError(f"codes must be VectorCodes from encode(), got {type(codes).__name__}")
        if self.layout == "planes":
            return unpack_planes(codes.indices, self.d)
        return unpack_bits(codes.indices, self.index_bits, self.blocks)

    def decode(self, codes: VectorCodes, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x_hat[..., d]`` = nu * (concatenated codewords) @ Pi, in ``dtype`` (default: the encoded dtype)."""
        dtype = codes.dtype if dtype is None else dtype
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        rotation = self.tensors(codes.indices.device, compute)[0]
        unit = self._codewords(codes, compute)
        return ((unit @ rotation) * codes.norms.to(compute).unsqueeze(-1)).to(dtype)

    def decode_rotated(
        self, codes: VectorCodes, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``x_hat Pi^T = nu * (concatenated codewords)``, ``[..., d]`` in ``dtype``: the decoded vectors in the
        rotated space, without the d x d product per vector that :meth:`decode` spends rotating them back.
        Attention needs no more: Pi is orthogonal, so ``q . x_hat = (q Pi^T) . (x_hat Pi^T)`` and a weighted
        sum of values rotates back once (:mod:`pyramidkv.kernels.reference`)."""
        unit = self._codewords(codes, dtype)
        return unit * codes.norms.to(dtype).unsqueeze(-1)

    def _codewords(self, codes: VectorCodes, dtype: torch.dtype) -> torch.Tensor:
        """The concatenated codewords of ``codes``, ``[..., d]`` in ``dtype``. Where whole bytes hold whole
        indices (1, 2, 4 or 8 bits, N filling them), each byte is one index into :meth:`grouped_codebook`: a
        single gather, no unpacking; otherwise the indices are unpacked first."""
        device = codes.indices.device
        # embedding() is index_select: ~3x faster than advanced indexing for these rows on a CPU
        if 8 % self.index_bits or not self.full_indices or self.layout != "stream":
            codebook = self.tensors(device, dtype)[1]
            return F.embedding(self.unpack(codes), codebook).reshape(*codes.shape, self.d)
        table = self.grouped_codebook(8 // self.index_bits, device, dtype)
        words = F.embedding(codes.indices.int(), table)  # (..., bytes, coordinates per byte)
        return words.reshape(*codes.shape, words.shape[-2] * words.shape[-1])[..., : self.d]
