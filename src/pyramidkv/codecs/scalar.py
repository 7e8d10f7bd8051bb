"""Exact Lloyd-Max for one coordinate of a uniform unit vector: the codebook of TurboQuant-mse.

TurboQuant (Zandieh et al. 2025, arXiv 2504.19874, Eq. 4) solves a continuous 1-D k-means on the
coordinate density; FibQuant with k = 1 is the same quantizer. The cell probabilities and moments have
closed forms (see :mod:`.source`), so the iteration runs on the density itself rather than on samples:
no sampling noise, and each step provably lowers the distortion.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from .source import (
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
