"""The CUDA mma decode kernel on FibQuant and grouped TurboQuant codes against attention over the decoded codes.

The reference decodes keys and values to x_hat (``codec.decode``) and runs the plain chunked softmax in
float32, so an error in a fragment permutation, the lane-private tables, the tail masking or the merge of
the warps shows up. The kernel runs natively on a CUDA device of compute capability 8.0 or later. Without
one, the source is still compiled for sm_90 by NVRTC when the library is found (``PYRAMIDKV_NVRTC``, or the
``nvidia-cuda-nvrtc`` wheel), so a syntax or type error fails here; else those tests skip with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import types

import pytest
import torch

from pyramidkv.codecs import FibQuant, TurboQuant
from pyramidkv.kernels import cuda_decode
from pyramidkv.kernels.cuda_module import nvrtc_found
from pyramidkv.kernels.reference import chunked_attention

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device with mma.sync (sm_80+)")
TOLERANCE = (
    1e-2  # f16 codewords, queries and weights into mma (10 mantissa bits), as the Triton kernel
)


@functools.cache
def codec(dim: int, k: int, seed: int = 0, n: int = 256) -> FibQuant:
    return FibQuant(dim, k=k, n=n, seed=seed)


def rel_error(got, want) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.skipif(not nvrtc_found(), reason="NVRTC (libnvrtc.so) not found: set PYRAMIDKV_NVRTC")
@pytest.mark.parametrize(
    ("dim", "kn", "rows", "shared", "row"),
    [
        case
        for case in itertools.product(
            (64, 128), sorted(cuda_decode.CODES), cuda_decode.ROW_CAPS, (True, False), (256, 128)
        )
        if cuda_decode.whole_bytes(case[0], *case[1])
    ],
)
def test_every_variant_compiles_for_sm90(dim, kn, rows, shared, row):
    variant = cuda_decode.MmaVariant(dim, kn[0], rows, 8, shared, kn[1], stages=3, row_bytes=row)
    cubin = cuda_decode.compiled(variant, "sm_90")
    assert cubin[:4] == b"\x7fELF"


@pytest.mark.skipif(not nvrtc_found(), reason="NVRTC (libnvrtc.so) not found: set PYRAMIDKV_NVRTC")
@pytest.mark.parametrize(
    ("dim", "rows", "shared", "affine", "kn"),
    [
        *itertools.product(
            (64, 128), cuda_decode.ROW_CAPS, (True, False), (True, False), [(4, 256)]
        ),
        *itertools.product(
            (64, 128), cuda_decode.ROW_CAPS, (False,), (True,), [(2, 64)]
        ),  # 3-bit planes
    ],
)
def test_two_tile_slots_and_int8_keys_compile_for_sm90(dim, rows, shared, affine, kn):
    variant = cuda_decode.MmaVariant(
        dim, kn[0], rows, 8, shared, kn[1], 4, 256, affine, slot_tiles=2
    )
    assert cuda_decode.compiled(variant, "sm_90")[:4] == b"\x7fELF"


def test_keys_of_a_uniform_grid_take_the_int8_variant_in_two_tile_slots(monkeypatch):
    """2-bit keys of a uniform grid select ``keys_affine`` and rings of two-tile slots (RING of them); codebook
    keys, Lloyd-Max or 3-bit keys in the stream do not (at head dim 128), 3-bit keys in planes do, and a ring that
    two-tile slots do not divide takes one-tile slots. The launch's key table is the grid's step, and a variant
    refuses what it cannot hold."""
    props = types.SimpleNamespace(shared_memory_per_multiprocessor=228 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    device, cpu = torch.device("cuda", 96), torch.device("cpu")
    uniform, fib = TurboQuant(128, 2, grid="uniform"), FibQuant(128, bits=2)
    kernel = cuda_decode.variant(uniform, fib, 4, 8, None, device)
    assert kernel.keys_affine and (kernel.k, kernel.n, kernel.slot_tiles) == (4, 256, 2)
    assert kernel.stages == 2 * cuda_decode.RING and not kernel.shared_book
    for keys in (fib, TurboQuant(128, 2), TurboQuant(128, 3, grid="uniform")):
        other = cuda_decode.variant(keys, keys, 4, 8, None, device)
        assert not other.keys_affine and (other.slot_tiles, other.stages) == (1, cuda_decode.RING)
    # 3-bit keys in planes beside values of the same bytes per token: FibQuant's or the grid's own in the stream
    planes = TurboQuant(128, 3, grid="uniform", layout="planes")
    for values in (FibQuant(128, bits=3), TurboQuant(128, 3, grid="uniform")):
        three = cuda_decode.variant(planes, values, 4, 8, None, device)
        assert three.keys_affine and (three.k, three.n, three.slot_tiles) == (2, 64, 2)
        assert cuda_decode.tables(planes, values, three, cpu)[0].view(
            torch.float32
        ).item() == pytest.approx(planes.step)
    assert "keys and values must share" in cuda_decode.unsupported(planes, fib, 128, 4)
    assert "value codec" in cuda_decode.unsupported(fib, planes, 128, 4)  # planes are keys only
    with pytest.raises(ValueError, match="value codec"):
        cuda_decode.tables(fib, planes, kernel, cpu)
    assert cuda_decode.variant(uniform, fib, 4, 8, 3, device).slot_tiles == 1
    small = FibQuant(64, bits=2)  # codebook keys at head dim 64 take two-tile slots too
    assert cuda_decode.variant(small, small, 4, 8, None, device).slot_tiles == 2
    book_k, book_v = cuda_decode.tables(uniform, fib, kernel, cpu)
    assert book_k.view(torch.float32).item() == pytest.approx(uniform.step)
    assert torch.equal(book_v, fib.grouped_codebook(1, cpu, torch.float16).view(torch.int32))
    with pytest.raises(ValueError, match="uniform grid"):
        cuda_decode.tables(fib, fib, kernel, cpu)
    with pytest.raises(ValueError, match="keys_affine reads 2- or 3-bit codes"):
        cuda_decode.MmaVariant(128, 2, 4, keys_affine=True)
    with pytest.raises(ValueError, match="slot_tiles must be one of"):
        cuda_decode.MmaVariant(128, 4, 4, stages=3, slot_tiles=2)


@pytest.mark.parametrize(
    ("per_sm", "dim", "k", "n", "rows", "want"),
    [
        (228 * 1024, 128, 4, 256, 4, (2, 256, 2)),  # H200, 2 bits: 64 KiB table, 2 slots
        (228 * 1024, 128, 2, 256, 4, (2, 256, 2)),  # 4 bits: slots of 2 KiB per warp
        (228 * 1024, 128, 2, 64, 4, (2, 256, 2)),  # 3 bits: a 16 KiB table
        (228 * 1024, 128, 4, 256, 12, (2, 256, 1)),  # 9-16 rows: one block by registers anyway
        (164 * 1024, 128, 4, 256, 4, (2, 256, 2)),  # A100: two blocks of 82 KiB exactly
        (150 * 1024, 128, 4, 256, 4, (2, 128, 2)),  # two blocks only with 128-byte rows
        (100 * 1024, 128, 2, 256, 4, (2, 256, 1)),  # one block whatever the rows: the first
    ],
)
def test_the_variant_keeps_the_most_blocks_per_sm(monkeypatch, per_sm, dim, k, n, rows, want):
    """``variant`` picks the first of 256-byte rows and 128 (default ring) that fits as many blocks per
    SM as the registers allow, from the device's shared memory (faked here: no GPU needed)."""
    props = types.SimpleNamespace(shared_memory_per_multiprocessor=per_sm)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    device = torch.device(
        "cuda", per_sm // 4096
    )  # a device per size: the choice is cached per device
    kernel = cuda_decode.variant(codec(dim, k, n=n), codec(dim, k, n=n), rows, 8, None, device)
    assert (kernel.stages, kernel.row_bytes, kernel.blocks_per_sm(device)) == want


# (batch, kv heads, tokens, head dim) -> the splits within 5% of the least kernel + epilogue device time (all
# kernels of the layer path) on the H200 at batch 1, 2 bits (benchmarks/results/decode_split_time.json, us by
# split: 9/3 x 64 at 8k 12: 20.8, 16: 20.1, 24: 22.1; 32k 16: 24.8, 24: 25.3, 32: 24.2, 40: 26.6; 128k
# 24: 37.0, 32: 33.4, 40: 33.6, 44: 32.9, 48: 35.8 (past one block per SM); 32/8 x 128 at 8k 12: 29.9,
# 16: 29.2, 24: 35.9; 32k 12: 37.5, 16: 35.1; 128k 16: 60.3, 24: 69.9; the one-wave split, 33-88, took
# 33-66 us); and the headline, batch 8, where one wave allows only 4
SPLIT_CASES = [
    ((1, 3, 8192, 64), (12, 16)),
    ((1, 3, 32768, 64), (16, 32)),
    ((1, 3, 131072, 64), (32, 44)),
    ((1, 8, 8192, 128), (12, 16)),
    ((1, 8, 32768, 128), (16, 16)),
    ((1, 8, 131072, 128), (16, 16)),
    ((8, 8, 131072, 128), (4, 4)),
]


@pytest.mark.parametrize(("case", "band"), SPLIT_CASES)
def test_the_default_split_is_where_kernel_and_epilogue_measured_least(monkeypatch, case, band):
    """At small batches the one-wave split is far past the point where the epilogue's merge of the splits
    costs more than the kernel saves; the default lies between the measured best splits (faked H200)."""
    props = types.SimpleNamespace(
        shared_memory_per_multiprocessor=228 * 1024, multi_processor_count=132
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    batch, kv_heads, tokens, dim = case
    book = codec(dim, 4)
    kernel = cuda_decode.variant(book, book, 4, 8, None, torch.device("cuda", 97))
    split = cuda_decode.mma_split((batch, kv_heads, tokens), torch.device("cuda", 97), kernel)
    assert band[0] <= split <= band[1]


# (batch, kv heads, tokens, head dim) -> warps per block of the default, and the device times behind it (H200,
# 2 bits, kernel ms, 8 warps against the pick): the headline keeps 8 (256 of 264 slots); 9/3 x 64 at batch 32
# (96 rows) 0.280 -> 0.251 with 4 (480 of 528 slots against 192 of 264), batch 48 0.543 -> 0.405; 9/3 x 64 at
# batch 16 (48 rows) fills 240 of 264 with 8 warps and 528 of 528 with 4, 0.120 against 0.121 ms
FILL_CASES = [
    ((8, 8, 131072, 128), 8),
    ((32, 3, 131072, 64), 4),
    ((48, 3, 131072, 64), 4),
    ((1, 8, 131072, 128), 8),
    ((128, 3, 8192, 64), 8),
]


@pytest.mark.parametrize(("case", "warps"), FILL_CASES)
def test_the_default_block_fills_the_most_slots(monkeypatch, case, warps):
    """Without ``mma_warps`` the launch takes 8 or 4 warps per block, whichever leaves fewer of the SMs' block
    slots empty in its last wave (faked H200); the split is that variant's own."""
    props = types.SimpleNamespace(
        shared_memory_per_multiprocessor=228 * 1024, multi_processor_count=132
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    batch, kv_heads, tokens, dim = case
    device, book = torch.device("cuda", 96), codec(dim, 4)
    kernel, _ = cuda_decode.filling_variant(
        (batch, kv_heads, tokens), book, book, 3, None, None, device
    )
    assert kernel.warps == warps


def test_rows_pick_the_layout_that_holds_them(monkeypatch):
    """Up to 4 rows per KV head take the paired value layout, 5-8 the plain one, 9-16 two n-tiles."""
    props = types.SimpleNamespace(shared_memory_per_multiprocessor=228 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    book = codec(128, 4)
    caps = [
        cuda_decode.variant(book, book, rows, 8, None, torch.device("cuda", 98)).rows
        for rows in range(1, 17)
    ]
    assert caps == [4] * 4 + [8] * 4 + [16] * 8


def test_a_launch_no_sm_holds_is_refused(monkeypatch):
    props = types.SimpleNamespace(shared_memory_per_multiprocessor=228 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    book = codec(128, 2, n=256)  # 4 bits: 16 warps x 8 slots of 2 KiB are 264 KiB of rings
    with pytest.raises(ValueError, match="mma_warps=16 with mma_stages=8 need more shared memory"):
        cuda_decode.variant(book, book, 4, 16, 8, torch.device("cuda", 99))


def test_index_rows_the_async_copies_cannot_read_are_copied_once():
    """Rows must start on the kernel's copy size (16 bytes; 8 for 24-byte tokens): a view that does not gets a
    fresh, aligned copy (``contiguous`` would return the misaligned view itself); aligned codes, 24-byte
    tokens at an odd length included, pass through untouched."""
    codes = codec(128, 4).encode(torch.randn(2, 2, 33, 128))
    assert cuda_decode._aligned(codes) is codes
    raw = torch.zeros(8 + codes.indices.numel(), dtype=torch.uint8)
    shifted = raw[8:].view(codes.indices.shape)  # dense, 8 bytes off a 16-byte boundary
    shifted.copy_(codes.indices)
    fixed = cuda_decode._aligned(dataclasses.replace(codes, indices=shifted))
    assert shifted.data_ptr() % 16 == 8 and fixed.indices.data_ptr() % 16 == 0
    assert torch.equal(fixed.indices, codes.indices)
    odd = codec(64, 2, n=64).encode(
        torch.randn(1, 2, 33, 64)
    )  # 24-byte tokens, rows 8-byte aligned
    assert odd.indices.shape[-1] == 24 and cuda_decode._aligned(odd) is odd


def test_which_codes_it_reads():
    assert cuda_decode.unsupported(codec(128, 4), codec(128, 4), 128, 16) is None
    assert cuda_decode.unsupported(codec(64, 2), codec(64, 2), 64, 1) is None
    assert "(k, N) in" in cuda_decode.unsupported(FibQuant(64, k=4, n=32), codec(64, 2), 64, 4)
    # 1.5 bits (k = 4, 6-bit indices): a lane's value indices are 12 bits at head dim 64, 24 at 128
    assert "not whole bytes" in cuda_decode.unsupported(
        FibQuant(64, k=4, n=64), FibQuant(64, k=4, n=64), 64, 4
    )
    assert (
        cuda_decode.unsupported(FibQuant(128, k=4, n=64), FibQuant(128, k=4, n=64), 128, 4) is None
    )
    with pytest.raises(ValueError, match="not whole bytes"):
        cuda_decode.MmaVariant(64, 2, 4, n=32)
    assert cuda_decode.unsupported(FibQuant(64, k=2, n=64), FibQuant(64, k=2, n=64), 64, 4) is None
    assert "share k and N" in cuda_decode.unsupported(codec(64, 4), codec(64, 2), 64, 4)
    assert "head dim" in cuda_decode.unsupported(codec(32, 4), codec(32, 4), 32, 4)
    assert "16 query rows" in cuda_decode.unsupported(codec(64, 4), codec(64, 4), 64, 17)
    assert not cuda_decode.usable(codec(64, 4), codec(64, 4), 64, 4, torch.device("cpu"))
    # TurboQuant's scalar codes, grouped: keys and values must group into the same (k, N)
    assert cuda_decode.unsupported(TurboQuant(64, 3), TurboQuant(64, 3), 64, 4) is None
    assert cuda_decode.unsupported(TurboQuant(64, 4), codec(64, 2), 64, 4) is None
    assert "share k and N" in cuda_decode.unsupported(TurboQuant(64, 2), TurboQuant(64, 4), 64, 4)
    assert "TurboQuant at 2, 3 and 4 bits" in cuda_decode.unsupported(
        TurboQuant(64, 1), TurboQuant(64, 1), 64, 4
    )
    with pytest.raises(ValueError, match="k must be 2 or 4"):
        cuda_decode.MmaVariant(64, 8, 4)
    with pytest.raises(ValueError, match=r"rows must be one of \(4, 8, 16\)"):
        cuda_decode.MmaVariant(64, 4, 5)
    with pytest.raises(ValueError, match=r"stages must be in 2\.\.8"):
        cuda_decode.MmaVariant(64, 4, 4, stages=1)


@pytest.mark.parametrize(
    ("make", "want"),
    [
        (lambda: codec(64, 4), (4, 256, 1)),
        (lambda: FibQuant(64, k=2, n=64), (2, 64, 1)),
        (lambda: TurboQuant(64, 2), (4, 256, 4)),  # four 2-bit indices: one byte
        (lambda: TurboQuant(64, 3), (2, 64, 2)),  # two 3-bit indices: 6 bits
        (lambda: TurboQuant(64, 4), (2, 256, 2)),
        (lambda: FibQuant(64, k=2, n=16), (4, 256, 2)),  # two 4-bit indices of 2 coordinates
        (lambda: TurboQuant(64, 1), None),  # 8 coordinates per byte: no k = 8 table
        (lambda: TurboQuant(64, 5), None),
        (lambda: FibQuant(64, k=2, n=48), None),  # indices that do not fill their bits
        (
            lambda: FibQuant(64, k=4, n=64),
            (4, 64, 1),
        ),  # 1.5 bits (read at head dim 128: whole_bytes)
        (lambda: FibQuant(64, k=2, n=8), (4, 64, 2)),  # two 3-bit indices of 2 coordinates
        (lambda: FibQuant(64, k=4, n=32), None),  # 5-bit indices of 4 coordinates: no such table
    ],
)
def test_the_codewords_it_gathers(make, want):
    assert cuda_decode.gathered(make()) == want


def test_turboquant_codes_run_the_fibquant_variant_of_their_rate(monkeypatch):
    """Grouped TurboQuant codes compile nothing new: the variant of FibQuant's (k, N) at the same rate."""
    props = types.SimpleNamespace(shared_memory_per_multiprocessor=228 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    device = torch.device("cuda", 99)
    for bits, (k, n) in {2: (4, 256), 3: (2, 64), 4: (2, 256)}.items():
        turbo, fib = TurboQuant(128, bits), FibQuant(128, k=k, n=n)
        kernel = cuda_decode.variant(turbo, turbo, 4, 8, None, device)
        assert kernel == cuda_decode.variant(fib, fib, 4, 8, None, device)
        book_k, book_v = cuda_decode.tables(turbo, turbo, kernel, torch.device("cpu"))
        assert book_k.dtype == torch.int32 and book_k.shape == (n, k // 2) and book_v is book_k


def _attend(query, ck, cv, codes_k, codes_v, lengths, split, mma, workspace=None, **tuning):
    from pyramidkv.kernels.dispatch import fibquant_decode_attention

    return fibquant_decode_attention(
        query, codes_k, codes_v, ck, cv, query.shape[-1] ** -0.5, lengths, split=split,
        workspace=workspace, mma=mma, **tuning,
    )  # fmt: skip


def _block(dim, ck, cv, batch, kv_heads, slots, seed):
    torch.manual_seed(seed)
    keys = torch.randn(batch, kv_heads, slots, dim, device="cuda") * 3
    values = torch.randn(batch, kv_heads, slots, dim, device="cuda")
    codes_k, codes_v = ck.encode(keys), cv.encode(values)
    return codes_k, codes_v, ck.decode(codes_k, torch.float32), cv.decode(codes_v, torch.float32)


# query rows per KV head (G x q_len) from 2 to 15, with a given split or the default
ROW_CASES = pytest.mark.parametrize(
    ("q_heads", "kv_heads", "q_len", "split"),
    [(4, 2, 1, 1), (8, 2, 1, 3), (6, 2, 3, None), (32, 8, 2, 2), (9, 3, 5, 4)],
    ids=["rows2", "rows4", "rows9", "rows8", "rows15"],
)


@needs_gpu
@pytest.mark.parametrize(
    ("dim", "make"),
    [
        *[(dim, functools.partial(codec, dim, k, n=n)) for dim, k, n in (
            (128, 4, 256), (128, 2, 256), (64, 4, 256), (64, 2, 256), (128, 2, 64), (64, 2, 64),
            (128, 4, 64), (128, 2, 32), (128, 2, 128))],  # 1.5, 2.5 and 3.5 bits: 6-, 5- and 7-bit indices
        # TurboQuant: 4, 2 and 2 scalar indices read as one (product tables)
        *[(dim, functools.partial(TurboQuant, dim, bits)) for dim, bits in ((128, 2), (64, 3), (128, 4))],
    ],
    ids=["128-2bit", "128-4bit", "64-2bit", "64-4bit", "128-3bit", "64-3bit", "128-1.5bit", "128-2.5bit",
         "128-3.5bit", "128-tq2", "64-tq3", "128-tq4"],
)  # fmt: skip
@ROW_CASES
def test_matches_attention_over_decoded_codes(dim, make, q_heads, kv_heads, q_len, split):
    ck = cv = make()
    _against_decoded(dim, ck, cv, q_heads, kv_heads, q_len, split)


@needs_gpu
@pytest.mark.parametrize("dim", [128, 64])
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("values", ["fibquant", "same"])
@pytest.mark.parametrize("slot_tiles", [None, 1])
@ROW_CASES
def test_keys_of_a_uniform_grid_read_as_int8(
    dim, bits, values, slot_tiles, q_heads, kv_heads, q_len, split
):
    """2- and 3-bit keys of a uniform grid (3 bits in planes) go through the int8 score mma with no key codebook
    (``keys_affine``), with FibQuant values or values of the same grid, in rings of two-tile slots (the default)
    or one."""
    ck = TurboQuant(dim, bits, grid="uniform", layout="planes" if bits == 3 else "stream")
    cv = FibQuant(dim, bits=bits) if values == "fibquant" else TurboQuant(dim, bits, grid="uniform")
    kernel = _against_decoded(
        dim, ck, cv, q_heads, kv_heads, q_len, split, mma_slot_tiles=slot_tiles
    )
    assert kernel.keys_affine and kernel.slot_tiles == (slot_tiles or 2)


def _against_decoded(dim, ck, cv, q_heads, kv_heads, q_len, split, **tuning):
    """The kernel against attention over the decoded codes, per-row lengths from empty to all, its workspace
    poisoned with NaN, and its log-sum-exp against the Triton kernel's; returns the variant that ran."""
    from pyramidkv.kernels.plan import DEFAULT_TUNING, make_workspace, plan_block

    slots = 203
    codes_k, codes_v, keys, values = _block(dim, ck, cv, 2, kv_heads, slots, seed=dim + ck.n)
    # per row: empty, one token, under a tile, one tile, odd, everything
    pattern = torch.tensor([0, 1, 5, 16, 17, 203, 130, 64], device="cuda")
    lengths = pattern.repeat(2 * kv_heads)[: 2 * kv_heads].reshape(2, kv_heads)
    query = torch.randn(2, q_heads, q_len, dim, device="cuda")
    rows = q_heads // kv_heads * q_len
    assert cuda_decode.usable(ck, cv, dim, rows, query.device)  # not the Triton kernel's answer
    shape = (2, kv_heads, slots)
    tune = dataclasses.replace(DEFAULT_TUNING, **tuning)
    kernel, splits = plan_block(shape, ck, cv, rows, tune, query.device, split)
    workspace = make_workspace(2, kv_heads, rows, splits, dim, "cuda")
    for part in workspace:
        part.fill_(float("nan"))  # every entry must be written, empty splits included
    out, lse = _attend(query, ck, cv, codes_k, codes_v, lengths, split, True, workspace, **tuning)
    assert not any(bool(part.isnan().any()) for part in workspace)
    visible = (torch.arange(slots, device="cuda") < lengths[..., None]).unsqueeze(-2)
    want = chunked_attention(query, [(keys, values, visible)], dim**-0.5)
    assert rel_error(out, want) < TOLERANCE
    _, triton_lse = _attend(query, ck, cv, codes_k, codes_v, lengths, split, False)
    seen = torch.isfinite(triton_lse)
    assert torch.equal(seen, torch.isfinite(lse))  # -inf exactly for the rows that see no key
    assert rel_error(lse[seen], triton_lse[seen]) < 1e-3
    empty = (lengths == 0).repeat_interleave(q_heads // kv_heads, dim=1)
    assert bool((out[empty] == 0).all())
    return kernel


@needs_gpu
@pytest.mark.parametrize(
    ("warps", "stages", "slot_tiles"), [(8, 3, 1), (4, 4, 1), (2, 8, 1), (8, 4, 2), (2, 6, 2)]
)
@pytest.mark.parametrize(
    ("dim", "k", "n"),
    [(128, 4, 256), (128, 2, 64), (64, 2, 64), (128, 2, 32), (128, 1, 4), (128, 1, 8), (64, 1, 8)],
)
def test_rings_of_every_depth(warps, stages, slot_tiles, dim, k, n):
    """Each warp's ring of index bytes wraps many times (one split: ~40 tiles per warp at 2 warps) in slots of
    one tile or two, and ends in full tiles short of a slot and a partial tile, at 16-byte (d = 128) and 8-byte
    copies (d = 64, 3 bits: 24-byte rows); k = 1: keys of a uniform grid (``keys_affine``; N = 8 in planes, with
    the grid's values)."""
    if k == 1:
        bits = n.bit_length() - 1
        cv = TurboQuant(dim, bits, grid="uniform")
        ck = TurboQuant(dim, bits, grid="uniform", layout="planes") if bits == 3 else cv
    else:
        ck = cv = codec(dim, k, n=n)
    codes_k, codes_v, keys, values = _block(dim, ck, cv, 1, 2, 1285, seed=5)
    lengths = torch.tensor([[1285, 1000]], device="cuda")
    query = torch.randn(1, 8, 1, dim, device="cuda")
    out, _ = _attend(
        query, ck, cv, codes_k, codes_v, lengths, 1, True, mma_warps=warps, mma_stages=stages,
        mma_slot_tiles=slot_tiles,
    )  # fmt: skip
    visible = (torch.arange(1285, device="cuda") < lengths[..., None]).unsqueeze(-2)
    want = chunked_attention(query, [(keys, values, visible)], dim**-0.5)
    assert rel_error(out, want) < TOLERANCE


@needs_gpu
@pytest.mark.parametrize(("dim", "k", "n", "seeds"), [(128, 4, 256, (0, 0)), (128, 2, 64, (0, 0)),
                                                      (64, 2, 256, (0, 0)), (128, 4, 256, (0, 7))])  # fmt: skip
def test_tables_of_128_byte_rows(monkeypatch, dim, k, n, seeds):
    """The leaner table (128-byte rows, a second table for a different value codebook) that SMs with less
    shared memory than an H200's take, forced here."""
    monkeypatch.setattr(cuda_decode, "ROW_SIZES", (128,))
    cuda_decode._variant.cache_clear()
    ck, cv = codec(dim, k, n=n, seed=seeds[0]), codec(dim, k, n=n, seed=seeds[1])
    codes_k, codes_v, keys, values = _block(dim, ck, cv, 2, 2, 333, seed=3)
    lengths = torch.tensor([[333, 17], [1, 200]], device="cuda")
    query = torch.randn(2, 8, 1, dim, device="cuda")
    out, _ = _attend(query, ck, cv, codes_k, codes_v, lengths, None, True)
    cuda_decode._variant.cache_clear()
    visible = (torch.arange(333, device="cuda") < lengths[..., None]).unsqueeze(-2)
    want = chunked_attention(query, [(keys, values, visible)], dim**-0.5)
    assert rel_error(out, want) < TOLERANCE


@needs_gpu
def test_separate_codebooks_and_codes_that_are_views():
    """Keys and values with codebooks of different seeds (two tables), codes sliced out of a wider tensor."""
    ck, cv = codec(128, 4, seed=0), codec(128, 4, seed=7)
    codes_k, codes_v, keys, values = _block(128, ck, cv, 3, 2, 300, seed=1)
    view_k = dataclasses.replace(codes_k, indices=codes_k.indices[1:], norms=codes_k.norms[1:])
    view_v = dataclasses.replace(codes_v, indices=codes_v.indices[1:], norms=codes_v.norms[1:])
    query = torch.randn(2, 8, 1, 128, device="cuda")
    out, _ = _attend(query, ck, cv, view_k, view_v, None, None, True)
    want = chunked_attention(query, [(keys[1:], values[1:], None)], 128**-0.5)
    assert rel_error(out, want) < TOLERANCE


@needs_gpu
@pytest.mark.parametrize("spec", ["fibquant:2", "turboquant:3"])
def test_the_layer_path_reads_blocks_with_the_mma_kernel(spec):
    """fused_attention (one workspace for every block, one epilogue) with the mma kernel at head dim 64."""
    from pyramidkv.cache.blocks import CodedBlocks
    from pyramidkv.codecs.registry import make_codecs
    from pyramidkv.kernels.dispatch import fused_attention

    torch.manual_seed(2)
    codecs = make_codecs(spec, 64)
    assert cuda_decode.usable(codecs.keys, codecs.values, 64, 3, torch.device("cuda"))
    coded = CodedBlocks(codecs)
    chunks = []
    for slots, lengths in ((90, torch.tensor([[0, 9, 90]], device="cuda")), (64, None)):
        keys = torch.randn(1, 3, slots, 64, device="cuda") * 3
        values = torch.randn(1, 3, slots, 64, device="cuda")
        coded.add(keys, values, lengths)
        block = coded.blocks[-1]
        visible = (
            None
            if lengths is None
            else (torch.arange(slots, device="cuda") < lengths[..., None]).unsqueeze(-2)
        )
        chunks.append((codecs.keys.decode(block.keys, torch.float32), codecs.values.decode(block.values, torch.float32), visible))  # fmt: skip
    query = torch.randn(1, 9, 1, 64, device="cuda", dtype=torch.bfloat16)
    win_k = torch.randn(1, 3, 3, 64, device="cuda", dtype=torch.bfloat16)
    win_v = torch.randn(1, 3, 3, 64, device="cuda", dtype=torch.bfloat16)
    out = fused_attention(query, coded, win_k, win_v, 0.125)
    want = chunked_attention(query, [*chunks, (win_k, win_v, None)], 0.125)
    assert rel_error(out.transpose(1, 2), want) < 1.5e-2  # + the bf16 output rounding


def test_the_launcher_refuses_codes_and_queries_it_cannot_read():
    """``launch_mma_partials`` checks what it is given against the variant it was planned with, before anything
    reaches the GPU: 1-bit TurboQuant codes (8 coordinates per byte) name the key codec and the (k, N) the
    variant reads, value codes of another rate name the value codec and their (k, N), more query rows than the
    variant holds name its cap, and a float32 query names the dtype it needs."""
    from pyramidkv.kernels.plan import make_workspace

    fib, turbo, fib4 = codec(64, 4), TurboQuant(64, bits=1), FibQuant(64, k=2, n=256)
    codes = fib.encode(torch.randn(1, 1, 16, 64))
    workspace = make_workspace(1, 1, 2, 1, 64, "cpu")
    kernel = cuda_decode.MmaVariant(64, 4, 4)
    q_rot = torch.zeros(1, 1, 2, 64, dtype=torch.float16)
    refused = {
        r"key codec: the kernel variant reads \(k, N\) = \(4, 256\) at head dim 64, got codes it cannot read": (
            q_rot,
            turbo,
            fib,
        ),
        r"value codec: .* got \(k, N\) = \(2, 256\) at head dim 64": (q_rot, fib, fib4),
        r"up to 4 query rows per KV head, got 64 and 5": (q_rot.new_zeros(1, 1, 5, 64), fib, fib),
        r"q_rot must be contiguous float16, got torch\.float32": (q_rot.float(), fib, fib),
    }
    for match, (query, codec_k, codec_v) in refused.items():
        with pytest.raises(ValueError, match=match):
            cuda_decode.launch_mma_partials(
                query, codes, codes, codec_k, codec_v, None, workspace, 0, 1, kernel
            )
