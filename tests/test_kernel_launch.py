"""The host side of a fused decode call, on the CPU: the CUDA kernel's packed arguments, the remembered launch
plans, and the query rotated once.

References: ctypes' own C struct layout for the argument buffer, the plan computed afresh for the memo, and
float64 matrix products for the rotation.
"""

from __future__ import annotations

import ctypes
import math
import struct

import pytest
import torch

from pyramidkv.codecs import FibQuant
from pyramidkv.kernels import plan
from pyramidkv.kernels.cuda_module import pack_arguments


def test_packed_arguments_follow_the_c_layout():
    """Pointers, null pointers and int32 in any order land where a C struct of those members puts them (the
    kernel's parameter space: each at its natural alignment)."""
    tensors = [torch.arange(n, dtype=torch.float32) for n in (3, 5, 7)]
    args = [tensors[0], 7, None, -3, 9, tensors[1], 2**31 - 1, tensors[2], 4]
    members = [
        (f"a{i}", ctypes.c_int32 if isinstance(a, int) else ctypes.c_void_p)
        for i, a in enumerate(args)
    ]
    c_struct = type("Params", (ctypes.Structure,), {"_fields_": members})(
        *[a if isinstance(a, int) else None if a is None else a.data_ptr() for a in args]
    )
    packed = pack_arguments(args)
    last = members[-1][0]
    used = getattr(type(c_struct), last).offset + ctypes.sizeof(ctypes.c_int32)
    assert len(packed) == used  # no padding after the last parameter
    assert packed == bytes(c_struct)[:used]


def test_an_int_out_of_int32_is_refused():
    with pytest.raises(struct.error, match="format requires"):
        pack_arguments([2**31])


def codec(dim: int = 64, k: int = 4, n: int = 256) -> FibQuant:
    return FibQuant(dim, k=k, n=n, seed=0)


@pytest.fixture
def fresh_plans(monkeypatch):
    monkeypatch.setattr(plan, "_PLANS", {})
    return plan


def test_a_plan_is_remembered_and_equals_a_fresh_one(fresh_plans):
    book, cpu = codec(), torch.device("cpu")
    for waves in (2, 8):  # on a CPU the default split is waves / (batch x kv heads) programs
        tuning = plan.DecodeTuning(waves=waves)
        first = plan.plan_block((1, 1, 4096), book, book, 4, tuning, cpu)
        assert first == plan._plan((1, 1, 4096), book, book, 4, tuning, cpu, None) == (None, waves)
        assert plan.plan_block((1, 1, 4096), book, book, 4, tuning, cpu) is first
    assert plan.plan_block((1, 1, 4096), book, book, 4, plan.DEFAULT_TUNING, cpu, split=3) == (
        None,
        3,
    )
    assert len(fresh_plans._PLANS) == 3


def test_a_refused_split_is_refused_every_time_and_not_remembered(fresh_plans):
    book = codec()
    for _ in range(2):
        with pytest.raises(ValueError, match="split: got 0; expected an integer >= 1"):
            plan.plan_block((1, 1, 64), book, book, 4, plan.DEFAULT_TUNING, torch.device("cpu"), 0)
    assert fresh_plans._PLANS == {}


def test_the_plan_memory_keeps_the_newest(fresh_plans, monkeypatch):
    monkeypatch.setattr(plan, "PLANS_KEPT", 3)
    book = codec()
    shapes = [(1, 1, 64 * (i + 1)) for i in range(5)]
    for shape in shapes:
        plan.plan_block(shape, book, book, 4, plan.DEFAULT_TUNING, torch.device("cpu"))
    assert [key[0] for key in fresh_plans._PLANS] == shapes[2:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_query_is_rotated_scaled_and_grouped_by_kv_head(dtype):
    """u = q Pi^T scaling log2(e) in float64, rows g q_len + i of KV head h holding query head h G + g, token
    i; from a bf16 query in the model's (batch, q_len, heads, d) memory order (a transposed view)."""
    batch, kv_heads, group, q_len, dim, scaling = 2, 3, 4, 3, 64, 0.125
    book = codec(dim)
    torch.manual_seed(0)
    query = torch.randn(batch, q_len, kv_heads * group, dim).to(torch.bfloat16).transpose(1, 2)
    got = plan.rotate_query(query, book, scaling, kv_heads, dtype)
    want = query.double() @ book.rotation.double().T * (scaling / math.log(2))
    want = want.reshape(batch, kv_heads, group, q_len, dim).reshape(batch, kv_heads, -1, dim)
    assert got.dtype == dtype and got.is_contiguous() and got.shape == want.shape
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert float((got.double() - want).abs().max() / want.abs().max()) < tol


@pytest.mark.parametrize("q_len", [1, 4, 40])
def test_many_query_rows_attend_in_torch_not_in_one_fused_call(q_len, monkeypatch):
    """The fused path takes a call of at most FUSED_ROWS query rows per KV head (its epilogue's shared memory
    grows with them); a longer block of new tokens (a prefill chunk, teacher forcing) attends in torch, with
    the torch path's attention."""
    import pyramidkv.cache.layers
    from pyramidkv import CompressedCache
    from pyramidkv.cache.compat import cache_kwargs
    from pyramidkv.kernels.dispatch import FUSED_ROWS
    from tests.conftest import make_tiny

    calls = []
    monkeypatch.setattr(
        pyramidkv.cache.layers, "fused_attention", lambda *args: calls.append(args) or 0 / 0
    )
    model = make_tiny("llama")
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    ids = torch.randint(
        3, model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0)
    )
    cache = CompressedCache(model, "snapkv", 24, codec="fibquant:3", kernel="triton")
    with torch.no_grad():
        model(ids[:, :48], **cache_kwargs(model, cache))
        if group * q_len <= FUSED_ROWS:
            with pytest.raises(ZeroDivisionError):
                model(ids[:, 48 : 48 + q_len], **cache_kwargs(model, cache))
            assert calls
            return
        got = model(ids[:, 48 : 48 + q_len], **cache_kwargs(model, cache)).logits
    reference = CompressedCache(model, "snapkv", 24, codec="fibquant:3", kernel="torch")
    with torch.no_grad():
        model(ids[:, :48], **cache_kwargs(model, reference))
        want = model(ids[:, 48 : 48 + q_len], **cache_kwargs(model, reference)).logits
    assert not calls
    torch.testing.assert_close(got, want)
