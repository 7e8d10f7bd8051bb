"""The fused encode kernel against the torch encoder of the same codec (rotated-block codes).

The two compute the same nearest codeword from rotations rounded differently, so an index may differ where
a block lies on a cell border: the test allows a few such flips and checks that each one is a near-tie
(the two codewords' distances agree to float32 rounding), and that the decoded vectors are as close to x.
"""

from __future__ import annotations

import pytest
import torch

from pyramidkv.codecs import FibQuant, TurboQuant
from pyramidkv.kernels.fibquant_encode import fused_encode

from .kernel_device import kernel_device

DEVICE = kernel_device()


@pytest.mark.parametrize(
    "make",
    [
        lambda: FibQuant(32, k=4, n=256),  # 8-bit indices, stored as bytes by the kernel
        lambda: FibQuant(32, k=2, n=64),  # 6-bit indices, packed after the kernel
        lambda: TurboQuant(16, 3),  # k = 1
    ],
    ids=["fib2bit", "fib3bit", "turboquant3"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("few", [False, True], ids=["tiles", "one-per-program"])
def test_fused_encode_matches_torch_encoder(make, dtype, few):
    codec = make()
    torch.manual_seed(0)
    x = (torch.randn(3, 2, 29, codec.d, device=DEVICE) * 4).to(dtype)  # 174 vectors: a partial tile
    want, got = codec.encode(x), fused_encode(codec, x, few)
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
