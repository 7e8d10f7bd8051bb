"""The fused encode kernel against the torch encoder of the same codec (rotated-block codes).

The two compute the same nearest codeword from rotations rounded differently, so an index may differ where
a block lies on a cell border: the test allows a few such flips and checks that each one is a near-tie
(the two codewords' distances agree to float32 rounding), and that the decoded vectors are as close to x.
"""

from __future__ import annotations

import pytest
import torch

from .kernel_device import kernel_device

DEVICE = kernel_device()

import triton  # noqa: E402  (after kernel_device: the interpreter's switch, or the module's skip)
import triton.language as tl  # noqa: E402

from pyramidkv.codecs import FibQuant, TurboQuant  # noqa: E402
from pyramidkv.codecs.packing import pack_bits, packed_bytes  # noqa: E402
from pyramidkv.codecs.planes import pack_planes  # noqa: E402
from pyramidkv.kernels.encode import _packed, fused_encode  # noqa: E402


@triton.jit
def _pack_kernel(idx_ptr, out_ptr, M: tl.constexpr, W: tl.constexpr, NB: tl.constexpr,
                 NB_P2: tl.constexpr, PLANES: tl.constexpr):  # fmt: skip
    """The bytes ``_packed`` makes of M indices, as the one-vector encode kernel stores them."""
    packed = _packed(tl.load(idx_ptr + tl.arange(0, M)), M, W, NB_P2, PLANES)
    tl.store(out_ptr + tl.arange(0, NB_P2), packed.to(tl.uint8), mask=tl.arange(0, NB_P2) < NB)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FibQuant(32, k=4, n=256),  # 8-bit indices, stored as bytes by the kernel
        lambda: FibQuant(32, k=2, n=64),  # 6-bit indices, packed after the kernel
        lambda: TurboQuant(16, 3),  # k = 1
        lambda: TurboQuant(64, 3, grid="uniform", layout="planes"),  # 3-bit codes in planes
        lambda: TurboQuant(128, 2, grid="uniform"),  # four to a byte
    ],
    ids=["fib2bit", "fib3bit", "turboquant3", "planes3", "uniform2"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("few", [False, True], ids=["tiles", "one-per-program"])
def test_fused_encode_matches_torch_encoder(make, dtype, few):
    _against_torch(make(), dtype, few)


@pytest.mark.parametrize(
    ("count", "bits", "planes"),
    [(64, 2, 0), (64, 3, 0), (32, 5, 0), (32, 6, 0), (16, 7, 0), (16, 11, 0), (16, 13, 0), (8, 16, 0),
     (64, 3, 16), (128, 3, 32)],
)  # fmt: skip
def test_the_kernels_packing_equals_the_codecs(count, bits, planes):
    """``_packed``, which the one-vector encode kernel stores, against :func:`pack_bits` (every width whose
    indices straddle two or three bytes) and :func:`pack_planes`, on random indices."""
    torch.manual_seed(bits)
    indices = torch.randint(0, 1 << bits, (count,), dtype=torch.int32, device=DEVICE)
    nbytes = packed_bytes(count, bits)
    got = torch.zeros(nbytes, dtype=torch.uint8, device=DEVICE)
    _pack_kernel[(1,)](indices, got, count, bits, nbytes, 1 << (nbytes - 1).bit_length(), planes)
    want = pack_planes(indices, count) if planes else pack_bits(indices, bits)
    assert torch.equal(got, want)


def _against_torch(codec, dtype, few):
    torch.manual_seed(0)
    x = (torch.randn(3, 2, 29, codec.d, device=DEVICE) * 4).to(dtype)  # 174 vectors: a partial tile
    want, got = codec.encode(x), fused_encode(codec, x, few)
    # one vector per program packs in the kernel, the tiles in torch after it: both in the codec's layout
    assert got.indices.shape == want.indices.shape and got.indices.dtype == torch.uint8
    assert got.norms.dtype == torch.float16
    torch.testing.assert_close(got.norms, want.norms, rtol=1e-3, atol=0)
    idx_want, idx_got = codec.unpack(want), codec.unpack(got)
    differ = idx_want != idx_got
    assert differ.float().mean() < 0.01
    if differ.any():  # each flip is a near-tie between the two codewords
        unit = (x.float() / x.float().norm(dim=-1, keepdim=True)) @ codec.rotation.to(DEVICE).T
        blocks = unit.reshape(*idx_want.shape, codec.k)[differ]
        book = codec.codebook.to(DEVICE)
        gap = ((blocks - book[idx_got[differ]]) ** 2).sum(-1) - (
            (blocks - book[idx_want[differ]]) ** 2
        ).sum(-1)
        assert gap.abs().max() < 1e-4
    err_want = (codec.decode(want, torch.float32) - x.float()).norm()
    err_got = (codec.decode(got, torch.float32) - x.float()).norm()
    assert err_got <= err_want * 1.001


def test_fused_encode_rejects_bad_input():
    codec = FibQuant(32, k=4, n=256)
    with pytest.raises(ValueError, match=r"NaN|nan|finite"):
        fused_encode(codec, torch.full((2, 32), float("nan"), device=DEVICE))
    with pytest.raises(ValueError, match="fp16 range"):
        fused_encode(codec, torch.full((2, 32), 1e5, device=DEVICE))
    empty = fused_encode(codec, torch.zeros(0, 32, device=DEVICE))
    assert empty.indices.shape == (0, 8) and empty.norms.shape == (0,)
