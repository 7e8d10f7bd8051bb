"""The shared rotation: orthogonal, deterministic per seed, and Haar (no QR sign bias)."""

from __future__ import annotations

import pytest
import torch

from pyramidkv.codecs import haar_rotation


@pytest.mark.parametrize("d", [2, 7, 64, 128])
def test_orthogonal_in_float64(d):
    rotation = haar_rotation(d, seed=3)
    assert rotation.dtype == torch.float64
    eye = torch.eye(d, dtype=torch.float64)
    assert torch.allclose(rotation @ rotation.T, eye, atol=1e-12)
    assert torch.allclose(rotation.T @ rotation, eye, atol=1e-12)


def test_deterministic_per_seed():
    assert torch.equal(haar_rotation(16, 5), haar_rotation(16, 5))
    assert not torch.allclose(haar_rotation(16, 5), haar_rotation(16, 6))


def test_returns_a_copy():
    rotation = haar_rotation(8, 0)
    rotation.zero_()
    assert haar_rotation(8, 0).abs().sum() > 0


def test_haar_statistics():
    """Under Haar measure every entry is symmetric with variance 1/d. Plain QR (LAPACK's sign convention)
    makes every diagonal entry negative; the sign fix must remove that bias."""
    d, seeds = 6, 300
    stack = torch.stack([haar_rotation(d, seed) for seed in range(seeds)])
    diagonal = torch.diagonal(stack, dim1=-2, dim2=-1)
    assert abs(float((diagonal > 0).double().mean()) - 0.5) < 0.06  # 1800 signs: std 0.012
    assert abs(float(diagonal.mean())) < 0.03  # std of the mean about 0.4 / sqrt(1800) = 0.01
    assert abs(float((stack**2).mean()) * d - 1.0) < 1e-9  # rows are unit vectors
    assert abs(float(stack.mean())) < 0.01
    determinant = torch.linalg.det(stack)
    assert torch.allclose(determinant.abs(), torch.ones(seeds, dtype=torch.float64), atol=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="d must be"):
        haar_rotation(0)
    with pytest.raises(ValueError, match="seed must be"):
        haar_rotation(4, seed=-1)
