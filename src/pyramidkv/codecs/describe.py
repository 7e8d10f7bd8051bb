"""What ``pyramidkv codebook build|show`` prints: a codebook's size, rate and measured distortion.

Distortion is reported on the canonical source (uniform unit vectors in R^d), both per coordinate and
normalised, D = E||u - u_hat||^2 = d x (MSE per coordinate), the scale on which the Shannon lower bound is
4^-rate and TurboQuant's upper bound (sqrt(3) pi / 2) 4^-b (arXiv 2504.19874, Theorems 1 and 3).
"""

from __future__ import annotations

import math

import torch

from pyramidkv.codecs.fibquant import FibQuant
from pyramidkv.codecs.rotated import RotatedBlockCodec
from pyramidkv.codecs.scalar import lloyd_max_scalar, scalar_mse
from pyramidkv.codecs.store import codebook_path

TURBOQUANT_BOUND = math.sqrt(3) * math.pi / 2


def source_distortion(codec: RotatedBlockCodec, vectors: int = 20000, seed: int = 1) -> float:
    """Normalised MSE E||u - decode(encode(u))||^2 on ``vectors`` fresh uniform unit vectors (float32, CPU)."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(vectors, codec.d, generator=generator)
    unit = gaussian / torch.linalg.vector_norm(gaussian, dim=-1, keepdim=True)
    return float(((codec.decode(codec.encode(unit)) - unit) ** 2).sum(-1).mean())


def turboquant_distortion(d: int, bits: int) -> float:
    """Exact normalised MSE of TurboQuant-mse at ``bits`` per coordinate (its Lloyd-Max table on the density)."""
    return d * scalar_mse(lloyd_max_scalar(d, 1 << bits), d)


def describe_codebook(d: int, k: int, n: int, seed: int = 0, vectors: int = 20000) -> dict:
    """Build (or read from the cache) the codebook of ``(d, k, n, seed)`` and measure it.

    Keys: d, k, n, seed, rate (log2(n)/k), index_bits, bits_per_coordinate (stored, with the fp16 norm),
    codebook_bytes (float32 table), cache_path, mse_per_coordinate, normalized_mse, turboquant_normalized_mse
    (None when the rate is not a whole number of bits), shannon_bound (4^-rate), turboquant_bound.
    """
    codec = FibQuant(d, k, n, seed=seed)
    mse = source_distortion(codec, vectors)
    whole = codec.rate if float(codec.rate).is_integer() and 1 <= codec.rate <= 8 else None
    return {
        "d": d,
        "k": codec.k,
        "n": codec.n,
        "seed": seed,
        "rate": codec.rate,
        "index_bits": codec.index_bits,
        "bits_per_coordinate": codec.bits_per_coordinate(include_norm=True),
        "codebook_bytes": codec.n * codec.k * 4,
        "cache_path": str(codebook_path(d, codec.k, codec.n, seed)),
        "mse_per_coordinate": mse / d,
        "normalized_mse": mse,
        "turboquant_normalized_mse": None
        if whole is None
        else turboquant_distortion(d, int(whole)),
        "shannon_bound": 4.0**-codec.rate,
        "turboquant_bound": TURBOQUANT_BOUND * 4.0**-codec.rate,
    }
