"""The shared random rotation of FibQuant and TurboQuant (arXiv 2605.11478, Sec. 3; arXiv 2504.19874, Sec. 3).

After a Haar-random rotation, every unit vector looks like a uniform point on the sphere, so one codebook
built for that canonical source serves every head of every model without calibration.
"""

from __future__ import annotations

import functools

import torch

from pyramidkv.errors import PyramidKVError


@functools.lru_cache(maxsize=32)
def _haar_rotation(d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    gaussian = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # QR alone is not Haar: LAPACK's sign convention biases Q. Making diag(R) positive fixes it
    # (Mezzadri 2007, "How to generate random matrices from the classical compact groups").
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def haar_rotation(d: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal ``d x d`` matrix in float64 on the CPU, the same for the same ``(d, seed)``.

    Row convention used by the codecs: a row vector ``x`` is rotated as ``x @ Pi.T`` and rotated back as
    ``u @ Pi``. The returned tensor is a fresh copy, so callers may move or modify it.
    """
    if not isinstance(d, int) or d < 1:
        raise PyramidKVError(f"d must be a positive integer (the head dimension), got {d!r}")
    if not isinstance(seed, int) or seed < 0:
        raise PyramidKVError(f"seed must be a non-negative integer, got {seed!r}")
    return _haar_rotation(d, seed).clone()
