"""KIVI-style int codec against a slow loop reference: keys per channel, values per token."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyramidkv.codecs import KIVI


def reference(x: torch.Tensor, bits: int, group: int, axis: str) -> torch.Tensor:
    """Group by group with Python loops: min, fp16 scale and zero, round, clamp, dequantize."""
    moved = (x.transpose(-1, -2) if axis == "channel" else x).double().contiguous()
    out = torch.empty_like(moved)
    levels = 2**bits - 1
    rows = moved.reshape(-1, moved.shape[-1])
    for row, target in zip(rows, out.reshape(-1, moved.shape[-1]), strict=True):
        for start in range(0, len(row), group):
            part = row[start : start + group]
            zero = part.min().half().double()
            scale = ((part.max() - part.min()) / levels).half().double()
            q = (
                torch.zeros_like(part)
                if scale == 0
                else ((part - zero) / scale).round().clamp(0, levels)
            )
            target[start : start + group] = q * scale + zero
    return out.transpose(-1, -2) if axis == "channel" else out


@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(
    "shape", [(2, 64, 32), (3, 40, 24)]
)  # 40 tokens, 24 channels: partial groups
def test_matches_reference(axis, bits, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(bits))
    codec = KIVI(bits, group=16, axis=axis)
    x_hat = codec.decode(codec.encode(x))
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    assert torch.allclose(x_hat.double(), reference(x, bits, 16, axis), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_error_bound(dtype):
    x = torch.randn(4, 64, 32).to(dtype)
    codec = KIVI(4, group=32, axis="token")
    codes = codec.encode(x)
    x_hat = codec.decode(codes)
    assert x_hat.dtype == dtype
    step = codes.scale.float().repeat_interleave(32, dim=-1)
    assert ((x.float() - x_hat.float()).abs() <= step / 2 + 2e-2).all()


def test_bytes_and_rate():
    codec = KIVI(2, group=32, axis="channel")
    codes = codec.encode(torch.randn(3, 64, 128))  # per head: 2 token groups x 128 channels
    packed = 3 * 128 * 2 * (32 * 2 // 8)
    side = 2 * 3 * 128 * 2 * 2  # fp16 scale and zero per group
    assert codes.nbytes == packed + side
    assert codec.bits_per_coordinate(include_norm=True) * 3 * 64 * 128 / 8 == codes.nbytes
    assert codec.bits_per_coordinate(include_norm=False) == 2


def test_constant_groups_are_exact():
    x = torch.full((2, 32, 8), 0.375)
    codec = KIVI(2, group=32)
    assert torch.equal(codec.decode(codec.encode(x)), x)


def test_bad_input():
    with pytest.raises(ValueError, match="axis must be one of"):
        KIVI(2, axis="head")
    with pytest.raises(ValueError, match=r"bits: got 0; expected an integer in \[1, 8\]"):
        KIVI(0)
    with pytest.raises(ValueError, match="group: got 0; expected an integer >= 1"):
        KIVI(2, group=0)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., seq, d\)"):
        KIVI(2, axis="channel").encode(torch.randn(8))
    with pytest.raises(ValueError, match="x: got NaN or Inf"):
        KIVI(2).encode(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="fp16 range"):
        KIVI(2).encode(torch.tensor([[1e6, 0.0]]))


@settings(max_examples=25, deadline=None)
@given(
    bits=st.integers(1, 8),
    group=st.integers(1, 20),
    axis=st.sampled_from(["channel", "token"]),
    shape=st.lists(st.integers(1, 9), min_size=2, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
)
def test_random_inputs_never_crash_or_nan(bits, group, axis, shape, seed, scale):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    codec = KIVI(bits, group, axis)
    x_hat = codec.decode(codec.encode(x))
    assert x_hat.shape == x.shape and torch.isfinite(x_hat).all()
    # float32 here, float64 in the reference: a value on a rounding boundary may land one step apart
    widest_step = float(x.max() - x.min()) / (2**bits - 1)
    assert (
        (x_hat.double() - reference(x, bits, group, axis)).abs()
        <= widest_step * 1.01 + 1e-4 * scale
    ).all()
