"""FibQuant: a universal fixed-rate vector quantizer for KV caches (Lee & Kim 2026, arXiv 2605.11478).

Each head vector keeps its fp16 norm; its rotated direction is cut into d/k blocks of k coordinates, each
stored as one index into a shared N-word codebook matched to the canonical source (see :mod:`.codebook`).
The rate log2(N)/k bits per coordinate moves in fine steps, below one bit too: k = 4, N = 8 is 0.75 bit.
Against the scalar TurboQuant at the same rate the vector code gains both cell shape and density matching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pyramidkv.checks import check_int
from pyramidkv.codecs.rotated import RotatedBlockCodec
from pyramidkv.errors import PyramidKVError

MAX_BLOCK = 8  # k
MAX_CODEWORDS = 1 << 12  # N; Lloyd's cost grows as N^2
BYTE_CODEWORDS = 256  # preferred: an index fits one byte


def _power_of_two_exponent(value: float) -> int | None:
    nearest = round(value)
    return nearest if abs(value - nearest) < 1e-9 else None


def achievable_rates(d: int) -> list[tuple[float, int, int]]:
    """All ``(rate, k, N)`` with k | d, k <= 8 and N = 2^(rate k) a power of two in [2, MAX_CODEWORDS]."""
    return sorted(
        (log_n / k, k, 1 << log_n)
        for k in range(1, MAX_BLOCK + 1)
        if d % k == 0
        for log_n in range(1, int(math.log2(MAX_CODEWORDS)) + 1)
    )


def choose_block(d: int, bits: float) -> tuple[int, int]:
    """``(k, N)`` for a rate of ``bits`` per coordinate: the largest block whose codebook has at most 256 words
    (the vector gain grows with k; an index stays one byte), else the smallest codebook that gives the rate."""
    fits = [(k, n) for rate, k, n in achievable_rates(d) if abs(rate - bits) < 1e-9]
    if not fits:
        near = sorted(
            {rate for rate, _, _ in achievable_rates(d)}, key=lambda rate: abs(rate - bits)
        )[:6]
        raise PyramidKVError(
            f"bits={bits!r} is not a rate log2(N)/k with k in 1..{MAX_BLOCK} dividing d={d} and N a power of "
            f"two in [2, {MAX_CODEWORDS}]; nearest rates: {', '.join(f'{r:g}' for r in sorted(near))}"
        )
    small = [(k, n) for k, n in fits if n <= BYTE_CODEWORDS]
    return max(small) if small else min(fits, key=lambda kn: kn[1])


def resolve_block(
    d: int, k: int | None, n: int | None, bits: float | tuple[int, int] | None
) -> tuple[int, int]:
    """Check and complete the ``(k, N)`` of a FibQuant from whichever of k, n, bits were given."""
    if isinstance(bits, tuple):
        if k is not None or n is not None or len(bits) != 2:
            raise PyramidKVError(
                f"bits as a (k, N) pair excludes k and n, got bits={bits!r}, k={k!r}, n={n!r}"
            )
        k, n = bits
        bits = None
    if bits is not None and (
        isinstance(bits, bool) or not isinstance(bits, (int, float)) or not bits > 0
    ):
        raise PyramidKVError(
            f"bits must be a positive rate in bits per coordinate or a (k, N) pair, got {bits!r}"
        )
    if k is not None:
        check_int("k", k, 1, MAX_BLOCK)
        if d % k:
            raise PyramidKVError(
                f"k must divide d: d={d} is not a multiple of k={k}; choose k among "
                f"{[j for j in range(1, MAX_BLOCK + 1) if d % j == 0]}"
            )
    if n is not None:
        check_int("n", n, 2, MAX_CODEWORDS)
    if bits is None:
        if k is None or n is None:
            raise PyramidKVError(f"give k and n, or bits; got k={k!r}, n={n!r}, bits=None")
        return k, n
    if k is None and n is None:
        return choose_block(d, float(bits))
    if k is None:
        exponent = _power_of_two_exponent(math.log2(n) / bits)
        if exponent is None or not 1 <= exponent <= MAX_BLOCK or d % exponent:
            raise PyramidKVError(
                f"no block size k gives bits={bits!r} with n={n} (k = log2(n)/bits = "
                f"{math.log2(n) / bits:g} must be an integer in 1..{MAX_BLOCK} dividing d={d})"
            )
        return exponent, n
    exponent = _power_of_two_exponent(bits * k)
    if exponent is None or not 1 <= exponent <= math.log2(MAX_CODEWORDS):
        raise PyramidKVError(
            f"bits={bits!r} with k={k} needs N = 2^(bits k) = 2^{bits * k:g}, which must be a "
            f"power of two in [2, {MAX_CODEWORDS}]"
        )
    if n is not None and n != 1 << exponent:
        raise PyramidKVError(
            f"bits={bits!r}, k={k} and n={n} disagree: log2(n)/k = {math.log2(n) / k:g}"
        )
    return k, 1 << exponent


@dataclass
class FibQuant(RotatedBlockCodec):
    """FibQuant codec: ``FibQuant(d, k, n)``, ``FibQuant(d, bits=0.75)`` or ``FibQuant(d, bits=(k, n))``.

    d: head dimension (>= 2); k: block size 1..8 dividing d; n: codebook size 2..4096 (any integer; indices
    take ceil(log2 n) bits); bits: target rate log2(n)/k, from which missing k/n are derived (see
    :func:`choose_block`); seed: seeds the rotation and the codebook's training samples.
    After construction k, n and bits (the rate log2(n)/k) are all set, so equal codecs compare equal.
    The codebook is built on first use of a key and cached on disk (:mod:`.store`).
    """

    d: int
    k: int | None = None
    n: int | None = None
    bits: float | tuple[int, int] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("d", self.d, 2)
        check_int("seed", self.seed, 0, 2**63 - 1)
        self.k, self.n = resolve_block(self.d, self.k, self.n, self.bits)
        self.bits = self.rate
        self._setup()
