"""TurboQuant-mse (Zandieh et al. 2025, arXiv 2504.19874, Algorithm 1): the scalar baseline of FibQuant.

Same normalise-rotate-store as FibQuant, but every rotated coordinate is quantized alone with the 2^b-level
Lloyd-Max table of the coordinate law (exact, see :mod:`.scalar`). It is FibQuant with k = 1, N = 2^b, and
shares its engine; the paper bounds its normalised MSE by (sqrt(3) pi / 2) 4^-b.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import check_int
from .rotated import RotatedBlockCodec

MAX_BITS = 8


@dataclass
class TurboQuant(RotatedBlockCodec):
    """TurboQuant-mse codec: d = head dimension (>= 2), bits = b per coordinate (1..8), seed of the rotation."""

    d: int
    bits: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("d", self.d, 2)
        check_int("bits", self.bits, 1, MAX_BITS)
        check_int("seed", self.seed, 0, 2**63 - 1)
        self._setup()

    @property
    def k(self) -> int:
        """Block size: one coordinate."""
        return 1

    @property
    def n(self) -> int:
        """Levels of the scalar table: 2^bits."""
        return 1 << self.bits
