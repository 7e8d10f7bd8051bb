"""Exact Lloyd-Max for one coordinate of a uniform unit vector: the codebook of TurboQuant-mse.

TurboQuant (Zandieh et al. 2025, arXiv 2504.19874, Eq. 4) solves a continuous 1-D k-means on the
coordinate density; FibQuant with k = 1 is the same quantizer. The cell probabilities and moments have
closed forms (see :mod:`.source`), so the iteration runs on the density itself rather than on samples:
no sampling noise, and each step provably lowers the distortion.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, special

from pyramidkv.codecs.source import (
    companding_beta,
    coordinate_cdf,
    coordinate_first_moment,
    coordinate_second_moment,
)

MAX_ITERATIONS = 5000
TOLERANCE = 1e-13


def initial_levels(d: int, n: int) -> np.ndarray:
    """Companded quantiles: c_n = F^-1((n - 1/2)/N) for the density f^(1/3) (the k = 1 case of FibQuant's radii).

    The signed coordinate's squared value is Beta(1/2, beta_d1), so the quantile is
    sign(p - 1/2) sqrt(BetaInv(|2p - 1|; 1/2, beta_d1)).
    """
    p = (np.arange(1, n + 1) - 0.5) / n
    return np.sign(p - 0.5) * np.sqrt(
        special.betaincinv(0.5, companding_beta(d, 1), np.abs(2 * p - 1))
    )


def _cells(levels: np.ndarray) -> np.ndarray:
    return np.concatenate([[-1.0], (levels[1:] + levels[:-1]) / 2, [1.0]])


def scalar_mse(levels: np.ndarray, d: int) -> float:
    """Exact MSE of nearest-level quantization of one coordinate (levels sorted ascending)."""
    edges = _cells(np.asarray(levels, dtype=np.float64))
    mass = np.diff(coordinate_cdf(edges, d))
    first = np.diff(coordinate_first_moment(edges, d))
    second = np.diff(coordinate_second_moment(edges, d))
    return float(np.sum(second - 2 * levels * first + levels * levels * mass))


def lloyd_max_scalar(d: int, n: int) -> np.ndarray:
    """The ``n`` Lloyd-Max levels (ascending, float64) of one coordinate of a uniform unit vector in R^d."""
    start = initial_levels(d, n)
    levels = start.copy()
    for _ in range(MAX_ITERATIONS):
        edges = _cells(levels)
        mass = np.diff(coordinate_cdf(edges, d))
        first = np.diff(coordinate_first_moment(edges, d))
        updated = np.where(mass > 0, first / np.maximum(mass, 1e-300), levels)
        done = np.max(np.abs(updated - levels)) < TOLERANCE
        levels = updated
        if done:
            break
    return levels if scalar_mse(levels, d) <= scalar_mse(start, d) else start


def uniform_scalar(d: int, n: int) -> np.ndarray:
    """The ``n`` levels delta (i - (n - 1) / 2), i = 0 .. n - 1, of the uniform grid with the least exact MSE for
    one coordinate of a uniform unit vector in R^d (ascending, float64).

    A grid's level is affine in its index, so a decoder can use the index itself as the value (an int8 in a
    tensor-core mma) and apply the step and offset once per dot product: the CUDA decode kernel reads 2- and
    3-bit keys so, with no codebook (docs/kernels.md, section 2). At 2 bits it costs ~1% MSE over Lloyd-Max (the
    Gaussian limit: 0.1188 against 0.1175, Max 1960), more at higher rates (8% at 3 bits, 20% at 4).
    """
    centred = np.arange(n) - (n - 1) / 2
    top = 1.0 / max(centred[-1], 0.5)  # the top level within [-1, 1], where the coordinate lives
    best = optimize.minimize_scalar(
        lambda step: scalar_mse(step * centred, d), bounds=(1e-9, top), method="bounded",
        options={"xatol": 1e-12},
    )  # fmt: skip
    return best.x * centred
