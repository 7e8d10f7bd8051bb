"""FibQuant and TurboQuant end to end: shapes, dtypes, bytes, determinism, attention on codes, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyramidkv.codecs import FibQuant, TurboQuant, choose_block
from pyramidkv.codecs.describe import describe_codebook
from pyramidkv.errors import PyramidKVError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", autouse=True)
def codebook_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYRAMIDKV_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def fib():
    return FibQuant(32, 4, 16)


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float(((x - x_hat) ** 2).sum() / (x**2).sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_shape_and_dtype(fib, dtype, device):
    x = torch.randn(2, 3, 5, 32, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    codes = fib.encode(x)
    assert codes.indices.device.type == device and codes.indices.dtype == torch.uint8
    assert codes.norms.dtype == torch.float16 and codes.shape == (2, 3, 5)
    x_hat = fib.decode(codes)
    assert x_hat.shape == x.shape and x_hat.dtype == dtype and x_hat.device == x.device
    assert fib.decode(codes, dtype=torch.float64).dtype == torch.float64
    assert relative_error(x, x_hat) < 0.5  # 1 bit per coordinate: MSE about 0.34 of the energy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(fib):
    x = torch.randn(500, 32, generator=torch.Generator().manual_seed(1))
    on_cpu, on_gpu = fib.encode(x), fib.encode(x.cuda())
    same = (fib.unpack(on_cpu) == fib.unpack(on_gpu).cpu()).double().mean()
    assert same > 0.999  # float32 sums in another order may flip a near-tie
    assert torch.allclose(fib.decode(on_gpu).cpu(), fib.decode(on_cpu), atol=0.05)
    assert torch.equal(on_gpu.norms.cpu(), on_cpu.norms)


def test_bytes_and_rate(fib):
    x = torch.randn(7, 11, 32)
    codes = fib.encode(x)
    per_vector = 8 * 4 // 8 + 2  # 8 indices of 4 bits, one fp16 norm
    assert codes.nbytes == 77 * per_vector
    assert fib.rate == 1.0
    assert fib.bits_per_coordinate(include_norm=False) == 1.0
    assert fib.bits_per_coordinate(include_norm=True) * 32 * 77 / 8 == codes.nbytes


def test_fractional_and_sub_one_bit_rates():
    codec = FibQuant(64, 4, 8)
    assert codec.rate == 0.75 and codec.index_bits == 3
    assert codec.encode(torch.randn(5, 64)).indices.shape == (5, 6)  # 16 indices x 3 bits = 6 bytes
    assert choose_block(64, 0.75) == (8, 64)
    assert choose_block(64, 2) == (4, 256)
    assert choose_block(6, 2) == (3, 64)
    assert choose_block(7, 2) == (1, 4)
    assert FibQuant(12, n=5, k=2).index_bits == 3  # N need not be a power of two


def test_bits_argument_forms():
    assert (FibQuant(6, bits=2).k, FibQuant(6, bits=2).n) == (3, 64)
    assert (FibQuant(16, bits=(2, 8)).k, FibQuant(16, bits=(2, 8)).n) == (2, 8)
    assert FibQuant(16, k=2, bits=1.5).n == 8
    assert FibQuant(16, n=16, bits=2).k == 2
    assert FibQuant(6, bits=2) == FibQuant(6, 3, 64) != FibQuant(6, 3, 64, seed=1)
    assert FibQuant(6, 3, 64).bits == 2


def test_decode_is_norm_times_rotated_codewords(fib):
    x = torch.randn(6, 32, dtype=torch.float64)
    codes = fib.encode(x)
    index = fib.unpack(codes)
    assert index.shape == (6, 8) and index.dtype == torch.long and int(index.max()) < 16
    expected = fib.codebook.double()[index].reshape(6, 32) @ fib.rotation.double()
    expected = expected * codes.norms.double().unsqueeze(-1)
    assert torch.allclose(fib.decode(codes), expected, atol=1e-6)


def test_attention_on_codes(fib):
    """q . x_hat = nu * sum_m <(Pi q)_m, c_idx_m>: the identity the fused kernel relies on."""
    x, q = torch.randn(9, 32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    codes = fib.encode(x)
    rotated_q = (fib.rotation.double() @ q).reshape(8, 4)
    words = fib.codebook.double()[fib.unpack(codes)]  # (9, 8, 4)
    on_codes = codes.norms.double() * (words * rotated_q).sum((-1, -2))
    assert torch.allclose(on_codes, fib.decode(codes) @ q, atol=1e-5)


def test_deterministic_for_a_seed():
    x = torch.randn(20, 16)
    first, second = FibQuant(16, 2, 8, seed=1), FibQuant(16, 2, 8, seed=1)
    assert torch.equal(first.encode(x).indices, second.encode(x).indices)
    assert not torch.equal(first.rotation, FibQuant(16, 2, 8, seed=2).rotation)


def test_zero_vectors_decode_to_zero(fib):
    x = torch.zeros(4, 32, dtype=torch.float16)
    x[1] = 1.0
    x_hat = fib.decode(fib.encode(x))
    assert torch.isfinite(x_hat).all()
    assert torch.equal(x_hat[[0, 2, 3]], torch.zeros(3, 32, dtype=torch.float16))


def test_empty_input(fib):
    codes = fib.encode(torch.zeros(0, 32))
    assert fib.decode(codes).shape == (0, 32) and codes.nbytes == 0


def test_turboquant_is_fibquant_with_k_1():
    turbo, fib = TurboQuant(16, 3, seed=2), FibQuant(16, 1, 8, seed=2)
    assert torch.equal(turbo.codebook, fib.codebook) and turbo.rate == 3
    x = torch.randn(10, 16)
    assert torch.equal(turbo.encode(x).indices, fib.encode(x).indices)
    assert turbo.encode(x).nbytes == 10 * (16 * 3 // 8 + 2)


def test_vector_code_beats_scalar_through_the_codec():
    d = 32
    unit = torch.nn.functional.normalize(
        torch.randn(4000, d, generator=torch.Generator().manual_seed(3)), dim=-1
    )
    fib, turbo = FibQuant(d, 2, 16), TurboQuant(d, 2)
    assert relative_error(unit, fib.decode(fib.encode(unit))) < 0.98 * relative_error(
        unit, turbo.decode(turbo.encode(unit))
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d": 30, "k": 4, "n": 16}, "k must divide d"),
        ({"d": 32, "k": 4, "n": 1}, "n: got 1; expected an integer in"),
        ({"d": 32, "k": 9, "n": 16}, "k: got 9; expected an integer in"),
        ({"d": 32, "bits": 0.3}, "bits=0.3 is not a rate"),
        ({"d": 32, "k": 4, "bits": 0.3}, "bits=0.3 with k=4"),
        ({"d": 32, "k": 2, "n": 8, "bits": 2}, "disagree"),
        ({"d": 32, "k": 2}, "give k and n, or bits"),
        ({"d": 1, "k": 1, "n": 2}, "d: got 1; expected an integer >= 2"),
        ({"d": 32, "k": 2, "n": 4, "seed": -1}, "seed: got -1; expected an integer in"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FibQuant(**kwargs)


def test_bad_turboquant_bits():
    with pytest.raises(PyramidKVError, match=r"bits: got 0; expected an integer in \[1, 8\]"):
        TurboQuant(16, 0)
    with pytest.raises(PyramidKVError, match=r"bits: got 2\.5; expected an integer"):
        TurboQuant(16, 2.5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_refused(fib, bad):
    x = torch.randn(3, 32)
    x[1, 5] = bad
    with pytest.raises(ValueError, match="x: got NaN or Inf"):
        fib.encode(x)


def test_bad_input(fib):
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 32\)"):
        fib.encode(torch.randn(3, 16))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        fib.encode(torch.ones(3, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="beyond the fp16 range"):
        fib.encode(torch.full((2, 32), 1e5))


def test_describe_codebook():
    info = describe_codebook(32, 2, 16, seed=0, vectors=2000)
    assert info["rate"] == 2.0 and info["index_bits"] == 4 and info["codebook_bytes"] == 128
    assert info["shannon_bound"] == 4.0**-2
    assert info["shannon_bound"] < info["normalized_mse"] < info["turboquant_normalized_mse"]
    assert info["mse_per_coordinate"] * 32 == pytest.approx(info["normalized_mse"])
    assert describe_codebook(32, 4, 8, vectors=500)["turboquant_normalized_mse"] is None


CODECS = [(8, 1, 4), (8, 2, 5), (12, 3, 8), (16, 4, 16), (8, 8, 3)]


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    config=st.sampled_from(CODECS),
    lead=st.lists(st.integers(0, 3), max_size=2),
    dtype=st.sampled_from([np.float32, np.float16]),
)
def test_random_inputs_never_crash_or_nan(data, config, lead, dtype):
    d, k, n = config
    values = st.floats(-1000, 1000, width=16 if dtype == np.float16 else 32)
    x = torch.from_numpy(data.draw(arrays(dtype, (*lead, d), elements=values)))
    codec = FibQuant(d, k, n)
    x_hat = codec.decode(codec.encode(x))
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    assert torch.isfinite(x_hat).all()
    # the decoded direction is d/k codewords: its norm is at most sqrt(d/k) times the longest one
    bound = math.sqrt(d // k) * float(codec.codebook.norm(dim=-1).max())
    norms = torch.linalg.vector_norm(x.double(), dim=-1)
    assert (torch.linalg.vector_norm(x_hat.double(), dim=-1) <= norms * bound * 1.01 + 1e-3).all()


@pytest.mark.parametrize(
    ("codec", "group"),
    [
        (TurboQuant(64, 2), 4),
        (TurboQuant(64, 3), 2),
        (TurboQuant(32, 4), 2),
        (FibQuant(32, k=2, n=16), 2),
        (FibQuant(32, k=4, n=256), 1),
        (TurboQuant(32, 1), 8),
    ],
    ids=["turbo2-by4", "turbo3-by2", "turbo4-by2", "fib-k2-n16-by2", "fib-bytes", "turbo1-by8"],
)
def test_grouped_codebook_reads_the_packed_stream_group_indices_at_once(codec, group):
    """Decoding through the product table, the packed bytes read ``group * index_bits`` bits per index, gives
    the decode of one codeword per index (float64): the bit stream's order is the table's. So do the codec's
    ``decode`` and ``decode_rotated``, which read whole-byte indices through that table."""
    from pyramidkv.codecs.packing import unpack_bits

    torch.manual_seed(group)
    codes = codec.encode(torch.randn(5, 7, codec.d, dtype=torch.float64))
    table = codec.grouped_codebook(group, "cpu", torch.float64)
    assert table.shape == (codec.n**group, group * codec.k)
    rotation, codebook = codec.tensors("cpu", torch.float64)
    norms = codes.norms.double().unsqueeze(-1)
    # the obvious decode: one index at a time (unpack_bits is held to a bit-by-bit packer elsewhere)
    single = unpack_bits(codes.indices, codec.index_bits, codec.blocks)
    rotated = codebook[single].reshape(5, 7, codec.d) * norms
    joined = unpack_bits(codes.indices, group * codec.index_bits, codec.blocks // group)
    torch.testing.assert_close(
        table[joined].reshape(5, 7, codec.d) * norms, rotated, rtol=0, atol=0
    )
    torch.testing.assert_close(codec.decode_rotated(codes, torch.float64), rotated, rtol=0, atol=0)
    torch.testing.assert_close(
        codec.decode(codes, torch.float64), rotated @ rotation, rtol=0, atol=1e-12
    )
    assert codec.grouped_codebook(group, "cpu", torch.float64) is table  # cached
    assert torch.equal(
        codec.grouped_codebook(1, "cpu", torch.float64), codec.tensors("cpu", torch.float64)[1]
    )


def test_grouped_codebook_refuses_what_no_index_stream_holds():
    with pytest.raises(ValueError, match="group: got 0; expected an integer >= 1"):
        TurboQuant(16, 2).grouped_codebook(0, "cpu")
    with pytest.raises(
        ValueError, match=r"group: indices of N = 48 codewords \(not a power of two\)"
    ):
        FibQuant(16, k=2, n=48).grouped_codebook(2, "cpu")
