"""TurboQuant-mse (Zandieh et al. 2025, arXiv 2504.19874, Algorithm 1): the scalar baseline of FibQuant.

Same normalise-rotate-store as FibQuant, but every rotated coordinate is quantized alone with the 2^b-level
Lloyd-Max table of the coordinate law (exact, see :mod:`.scalar`). It is FibQuant with k = 1, N = 2^b, and
shares its engine; the paper bounds its normalised MSE by (sqrt(3) pi / 2) 4^-b.

``grid="uniform"`` takes the best uniform grid instead (:func:`.scalar.uniform_scalar`): levels affine in the
index, which the CUDA decode kernel multiplies as int8 with no codebook (keys: ``pyramidkv.kernels.cuda_decode``),
for ~1% more MSE than Lloyd-Max at 2 bits (8% at 3). At 3 bits the kernel reads them cut into registers from
``layout="planes"`` (:mod:`.planes`), not from the bit stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyramidkv.checks import check_int
from pyramidkv.codecs.planes import BITS as PLANE_BITS
from pyramidkv.codecs.planes import check_dim
from pyramidkv.codecs.rotated import LAYOUTS, RotatedBlockCodec
from pyramidkv.codecs.scalar import uniform_scalar
from pyramidkv.errors import PyramidKVError

MAX_BITS = 8
GRIDS = ("lloyd", "uniform")


@dataclass
class TurboQuant(RotatedBlockCodec):
    """TurboQuant-mse codec: d = head dimension (>= 2), bits = b per coordinate (1..8), seed of the rotation,
    grid of the levels (``GRIDS``: the Lloyd-Max table, or the best uniform grid), layout of the packed codes
    (``LAYOUTS``: the bit stream, or at 3 bits and d a multiple of 64 the planes of :mod:`.planes`)."""

    d: int
    bits: int = 2
    seed: int = 0
    grid: str = "lloyd"
    layout: str = "stream"

    def __post_init__(self) -> None:
        check_int("d", self.d, 2)
        check_int("bits", self.bits, 1, MAX_BITS)
        check_int("seed", self.seed, 0, 2**63 - 1)
        if self.grid not in GRIDS:
            raise PyramidKVError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if self.layout not in LAYOUTS:
            raise PyramidKVError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "planes":
            if self.bits != PLANE_BITS:
                raise PyramidKVError(
                    f"layout: planes hold {PLANE_BITS}-bit codes, got bits={self.bits}"
                )
            check_dim(self.d, "layout")
        self._step: float | None = None
        if self.grid == "lloyd":
            self._setup()
            return
        levels = uniform_scalar(self.d, self.n)  # exact and fast: no disk cache
        self._step = float(levels[1] - levels[0])
        self._setup(torch.from_numpy(levels)[:, None])

    @property
    def book_key(self) -> tuple:
        """What identifies the codebook and how codes read: the base's, the grid and the layout."""
        return (*super().book_key, self.grid, self.layout)

    @property
    def step(self) -> float | None:
        """The uniform grid's step (level i is step (i - (N - 1) / 2)), or None for the Lloyd-Max table."""
        return self._step

    @property
    def k(self) -> int:
        """Block size: one coordinate."""
        return 1

    @property
    def n(self) -> int:
        """Levels of the scalar table: 2^bits."""
        return 1 << self.bits
