"""Codebook quality, checked with float64 brute force on samples drawn independently of the library.

The reference source here is the definition itself: normalise a Gaussian vector of R^d and take k
coordinates (the library samples radius and direction separately instead).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from pyramidkv.codecs import FibQuant, TurboQuant, codebook, load_codebook
from pyramidkv.codecs.codebook import build_codebook, fibonacci_directions, initial_codebook
from pyramidkv.codecs.scalar import lloyd_max_scalar, scalar_mse, uniform_scalar
from pyramidkv.codecs.source import sample_source


@pytest.fixture(scope="module", autouse=True)
def codebook_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYRAMIDKV_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def unit_blocks(d: int, k: int, vectors: int, seed: int) -> np.ndarray:
    """All d/k blocks of ``vectors`` uniform unit vectors, as rows (float64)."""
    gaussian = np.random.default_rng(seed).standard_normal((vectors, d))
    unit = gaussian / np.linalg.norm(gaussian, axis=1, keepdims=True)
    return unit.reshape(-1, k)


def brute_force_mse(blocks: np.ndarray, words: np.ndarray) -> float:
    """Normalised MSE per coordinate (x d gives E||u - u_hat||^2): exhaustive nearest codeword, float64."""
    best = np.full(len(blocks), np.inf)
    for word in np.asarray(words, dtype=np.float64):
        best = np.minimum(best, ((blocks - word) ** 2).sum(1))
    return float(best.mean() / blocks.shape[1])


def test_source_matches_definition():
    d, k = 24, 3
    mine = sample_source(d, k, 20000, np.random.default_rng(0))
    reference = unit_blocks(d, k, 20000 // (d // k), seed=1)
    assert (
        stats.ks_2samp(np.linalg.norm(mine, axis=1), np.linalg.norm(reference, axis=1)).pvalue
        > 1e-3
    )
    assert stats.ks_2samp(mine[:, 0], reference[:, 0]).pvalue > 1e-3


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_turboquant_table_matches_max_1960(bits):
    """For large d a coordinate times sqrt(d) is standard normal: the levels and the MSE must be the
    Gaussian Lloyd-Max values of Max (1960), also quoted in the TurboQuant paper."""
    published = {
        1: ([0.7979], 0.3634),
        2: ([0.4528, 1.510], 0.1175),
        3: ([0.2451, 0.7560, 1.344, 2.152], 0.03454),
    }
    d = 100_000  # the table alone: a rotation of this size would not fit in memory
    table = load_codebook(d, 1, 1 << bits, seed=0)
    levels = torch.from_numpy(table).flatten() * math.sqrt(d)
    positive, mse = published[bits]
    assert np.allclose(levels[len(levels) // 2 :].numpy(), positive, atol=2e-3)
    assert np.allclose(-levels.flip(0).numpy(), levels.numpy(), atol=1e-6)  # symmetric
    blocks = np.random.default_rng(2).standard_normal((200_000, 1)) / math.sqrt(d)
    assert brute_force_mse(blocks, table) * d == pytest.approx(mse, rel=0.02)


def test_turboquant_one_bit_is_the_exact_centroid():
    """At b = 1 the two levels are +-E|X|, E|X| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))."""
    d = 40
    expected = math.exp(special.gammaln(d / 2) - special.gammaln((d + 1) / 2)) / math.sqrt(math.pi)
    levels = TurboQuant(d, 1).codebook.flatten()
    assert levels.tolist() == pytest.approx([-expected, expected], rel=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_turboquant_within_published_bounds(bits):
    """Shannon 4^-b <= D <= (sqrt(3) pi / 2) 4^-b (arXiv 2504.19874, Theorems 1 and 3)."""
    d = 64
    mse = brute_force_mse(unit_blocks(d, 1, 3000, seed=3), TurboQuant(d, bits).codebook.numpy()) * d
    assert 4.0**-bits < mse < math.sqrt(3) * math.pi / 2 * 4.0**-bits


@pytest.mark.parametrize(
    ("d", "k", "n"), [(32, 2, 16), (64, 4, 16), (64, 2, 64), (48, 3, 64), (64, 4, 256)]
)
def test_vector_code_beats_its_scalar_specialisation(d, k, n):
    """The paper's theorem: at matched rate, FibQuant's codebook has lower MSE than TurboQuant's table."""
    rate = round(math.log2(n) / k)
    blocks = unit_blocks(d, k, 6000, seed=4)
    vector = brute_force_mse(blocks, FibQuant(d, k, n).codebook.numpy())
    scalar = brute_force_mse(blocks.reshape(-1, 1), TurboQuant(d, rate).codebook.numpy())
    assert vector < 0.98 * scalar
    assert vector * d > 4.0**-rate  # and never below the Shannon bound


def test_mse_falls_as_n_grows():
    d, k = 32, 2
    blocks = unit_blocks(d, k, 4000, seed=5)
    mses = [brute_force_mse(blocks, FibQuant(d, k, n).codebook.numpy()) for n in (4, 8, 16, 64)]
    assert mses == sorted(mses, reverse=True) and len(set(mses)) == len(mses)


@pytest.mark.parametrize(("d", "k", "n"), [(32, 2, 16), (16, 4, 16), (24, 3, 8)])
def test_lloyd_improves_on_the_initial_codebook(d, k, n):
    blocks = unit_blocks(d, k, 6000, seed=6)
    refined = brute_force_mse(blocks, FibQuant(d, k, n).codebook.numpy())
    assert refined < brute_force_mse(blocks, initial_codebook(d, k, n))


def test_initial_codebook_kept_when_lloyd_is_worse(monkeypatch):
    monkeypatch.setattr(codebook, "lloyd", lambda points, words, iterations: words * 3.0)
    assert np.array_equal(build_codebook(16, 2, 8, seed=0), initial_codebook(16, 2, 8))


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
def test_initial_codebook_geometry(k):
    d, n = 32, 64
    directions = fibonacci_directions(k, n)
    assert np.allclose(np.linalg.norm(directions, axis=1), 1.0)
    assert np.linalg.norm(directions.mean(0)) < 0.2  # spread over the sphere, not clustered
    radii = np.linalg.norm(initial_codebook(d, k, n), axis=1)
    beta_dk = (k / (k + 2)) * (d - k - 2) / 2 + 1
    assert np.allclose(stats.beta(k / 2, beta_dk).cdf(radii**2), (np.arange(1, n + 1) - 0.5) / n)


def test_codebook_is_deterministic_and_seeded():
    assert np.array_equal(build_codebook(16, 2, 8, seed=1), build_codebook(16, 2, 8, seed=1))
    assert not np.array_equal(build_codebook(16, 2, 8, seed=1), build_codebook(16, 2, 8, seed=2))


def test_encode_picks_the_nearest_codeword():
    """Tiny case against brute force in float64: rotate, cut in blocks, try every codeword."""
    d, k, n = 8, 2, 5
    codec = FibQuant(d, k, n, seed=3)
    x = torch.randn(200, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    chosen = codec.unpack(codec.encode(x))
    rotation = codec.rotation.double()
    words = codec.codebook.double()
    blocks = ((x / x.norm(dim=-1, keepdim=True)) @ rotation.T).reshape(200, d // k, 1, k)
    distances = ((blocks - words) ** 2).sum(-1)  # (vectors, blocks, n)
    picked = distances.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(picked, distances.min(-1).values, atol=1e-12)


@pytest.mark.parametrize(("bits", "step", "mse"), [(2, 0.9957, 0.1188), (3, 0.5860, 0.03744)])
def test_uniform_grid_matches_max_1960(bits, step, mse):
    """For large d the best uniform grid of a coordinate is the Gaussian one of Max (1960, Table II): its step
    and its MSE, above the Lloyd-Max table's (0.1175 and 0.03454) as it must be."""
    d = 100_000
    levels = uniform_scalar(d, 1 << bits)
    assert np.allclose(np.diff(levels) * math.sqrt(d), step, atol=2e-3)
    assert np.allclose(levels, -levels[::-1], atol=1e-12)  # centred
    blocks = np.random.default_rng(2).standard_normal((200_000, 1)) / math.sqrt(d)
    assert brute_force_mse(blocks, levels[:, None]) * d == pytest.approx(mse, rel=0.02)


@pytest.mark.parametrize("d", [64, 128])
def test_uniform_grid_costs_about_one_percent_at_two_bits(d):
    """The exact MSE of the uniform grid at 2 bits sits between Lloyd-Max's and 2% over it, and no other step
    does better (a grid search on the exact MSE, independent of the optimiser)."""
    uniform, lloyd = uniform_scalar(d, 4), lloyd_max_scalar(d, 4)
    assert scalar_mse(lloyd, d) < scalar_mse(uniform, d) < 1.02 * scalar_mse(lloyd, d)
    step = uniform[1] - uniform[0]
    centred = np.arange(4) - 1.5
    for factor in np.linspace(0.9, 1.1, 21):
        assert scalar_mse(uniform, d) <= scalar_mse(step * factor * centred, d) + 1e-15


def test_turboquant_on_a_uniform_grid():
    """``grid="uniform"``: levels step (i - 1.5), a codebook identity of its own, and a clear error for an
    unknown grid."""
    codec, lloyd = TurboQuant(64, 2, grid="uniform"), TurboQuant(64, 2)
    levels = codec.codebook.flatten().double()
    assert torch.allclose(levels, codec.step * (torch.arange(4, dtype=torch.float64) - 1.5))
    assert lloyd.step is None and codec.book_key != lloyd.book_key
    unit = torch.nn.functional.normalize(torch.randn(2000, 64, dtype=torch.float64), dim=-1)
    got = float(((codec.decode(codec.encode(unit)).double() - unit) ** 2).sum(-1).mean())
    assert got == pytest.approx(64 * scalar_mse(uniform_scalar(64, 4), 64), rel=0.05)
    with pytest.raises(ValueError, match="grid must be one of"):
        TurboQuant(64, 2, grid="fibonacci")
