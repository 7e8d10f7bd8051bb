"""The canonical source of the rotated codecs: a k-block of a uniform unit vector in R^d.

After normalisation and a Haar rotation, k consecutive coordinates of a head vector are distributed as a
k-block of a uniform point on S^{d-1} (arXiv 2605.11478, Sec. 3): squared radius ~ Beta(k/2, (d-k)/2),
direction uniform on S^{k-1}. Codebooks are built for this law alone, with no calibration data.
For k = 1 the law has the density f(x) ∝ (1 - x^2)^((d-3)/2) on [-1, 1] (arXiv 2504.19874, Lemma 1), whose
cumulative moments have closed forms used for an exact scalar Lloyd-Max.
"""

from __future__ import annotations

import numpy as np
from scipy import special


def companding_beta(d: int, k: int) -> float:
    """Second Beta parameter of the companded radius law: beta_dk = (k/(k+2)) (d-k-2)/2 + 1.

    Bennett-Gersho: the optimal point density of a k-dimensional quantizer is proportional to f^(k/(k+2)),
    which turns the source's Beta(k/2, (d-k)/2) squared radius into Beta(k/2, beta_dk).
    """
    return (k / (k + 2)) * (d - k - 2) / 2 + 1


def sample_source(d: int, k: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` float64 samples ``(count, k)`` of a k-block of a uniform unit vector in R^d."""
    direction = rng.standard_normal((count, k))
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-300)
    if k == d:  # the block is the whole vector: it lies on the sphere
        return direction
    radius = np.sqrt(rng.beta(k / 2, (d - k) / 2, size=count))
    return direction * radius[:, None]


def coordinate_cdf(x: np.ndarray, d: int) -> np.ndarray:
    """P(X <= x) for one coordinate X of a uniform unit vector in R^d (d >= 2)."""
    x = np.clip(x, -1.0, 1.0)
    return 0.5 + 0.5 * np.sign(x) * special.betainc(0.5, (d - 1) / 2, x * x)


def coordinate_first_moment(x: np.ndarray, d: int) -> np.ndarray:
    """E[X; X <= x] in closed form: -(1 - x^2)^((d-1)/2) / ((d-1) B(1/2, (d-1)/2))."""
    x = np.clip(x, -1.0, 1.0)
    return -np.power(1.0 - x * x, (d - 1) / 2) / ((d - 1) * special.beta(0.5, (d - 1) / 2))


def coordinate_second_moment(x: np.ndarray, d: int) -> np.ndarray:
    """E[X^2; X <= x] = (1 + sign(x) I_{x^2}(3/2, (d-1)/2)) / (2d); it reaches E[X^2] = 1/d at x = 1."""
    x = np.clip(x, -1.0, 1.0)
    return (1.0 + np.sign(x) * special.betainc(1.5, (d - 1) / 2, x * x)) / (2 * d)
