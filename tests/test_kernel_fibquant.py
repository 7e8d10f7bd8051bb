"""The fused FibQuant decode kernel against chunked_attention over the decoded codes (codec.decode).

The reference never works in rotated space: it decodes keys and values to x_hat and runs the plain chunked
softmax, so an error in the rotation, the gather, the bit layout or the split merge shows up. On a machine
without CUDA the kernel runs in Triton's interpreter: tests/conftest.py sets ``TRITON_INTERPRET=1`` before
anything imports triton, and this module skips when triton is missing or the variable was set to something
else. With CUDA it runs natively.
"""

from __future__ import annotations

import functools

import pytest
import torch

from pyramidkv.codecs import FibQuant, TurboQuant
from pyramidkv.kernels.dispatch import fibquant_decode_attention
from pyramidkv.kernels.plan import make_workspace
from pyramidkv.kernels.reference import chunked_attention

from .kernel_device import kernel_device

DEVICE = kernel_device()

# the interpreter computes in float32; on CUDA tl.dot takes TF32 inputs (10-bit mantissa)
TOLERANCE = 1e-2 if DEVICE == "cuda" else 1e-3


@functools.cache
def codec(dim: int, k: int, n: int = 256) -> FibQuant:
    return FibQuant(dim, k=k, n=n)


def make_block(dim, k_keys, k_values, batch=2, kv_heads=2, slots=37, seed=0):
    """Random keys/values encoded as codes, plus their decoded float32 copies for the reference."""
    torch.manual_seed(seed)
    ck, cv = codec(dim, k_keys), codec(dim, k_values)
    keys = torch.randn(batch, kv_heads, slots, dim, device=DEVICE) * 3
    values = torch.randn(batch, kv_heads, slots, dim, device=DEVICE)
    codes_k, codes_v = ck.encode(keys), cv.encode(values)
    return (
        ck,
        cv,
        codes_k,
        codes_v,
        ck.decode(codes_k, torch.float32),
        cv.decode(codes_v, torch.float32),
    )


def visible_of(lengths, slots):
    return (torch.arange(slots, device=DEVICE) < lengths[..., None]).unsqueeze(-2)


def dense_lse(query, keys, visible, scaling):
    """float64 log-sum-exp of the scores of every query row over its visible keys."""
    group = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    scores = query.double() @ k.transpose(-1, -2) * scaling
    seen = visible.expand(*keys.shape[:2], query.shape[2], keys.shape[2])
    scores = scores.masked_fill(~seen.repeat_interleave(group, dim=1), float("-inf"))
    return torch.logsumexp(scores, dim=-1)


def rel_error(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize(
    ("dim", "k_keys", "k_values", "q_len", "split"),
    [(16, 4, 2, 1, 1), (16, 2, 4, 2, 3), (32, 4, 4, 1, None), (32, 2, 2, 3, 2)],
)
def test_matches_reference_over_decoded_codes(dim, k_keys, k_values, q_len, split):
    ck, cv, codes_k, codes_v, keys, values = make_block(dim, k_keys, k_values)
    lengths = torch.tensor(
        [[0, 1], [37, 20]], device=DEVICE
    )  # empty, one token, full odd, partial tile
    query = torch.randn(2, 6, q_len, dim, device=DEVICE)
    scaling = dim**-0.5
    workspace = make_workspace(2, 2, 3 * q_len, split or 3, dim, DEVICE)
    for part in workspace:
        part.fill_(float("nan"))  # poison: the kernel must write every entry, empty splits included
    out, lse = fibquant_decode_attention(
        query,
        codes_k,
        codes_v,
        ck,
        cv,
        scaling,
        lengths,
        split=split or 3,
        workspace=workspace,
    )
    assert not any(bool(part.isnan().any()) for part in workspace)
    visible = visible_of(lengths, 37)
    want = chunked_attention(query, [(keys, values, visible)], scaling)
    assert out.shape == query.shape and lse.shape == query.shape[:3]
    assert rel_error(out, want) < TOLERANCE
    want_lse = dense_lse(query, keys, visible, scaling)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))  # only the empty rows, all of them
    seen = torch.isfinite(want_lse)
    assert rel_error(lse[seen], want_lse[seen]) < TOLERANCE
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))  # length 0: zero output


def test_default_split_and_no_lengths():
    ck, cv, codes_k, codes_v, keys, values = make_block(16, 4, 4, batch=1, slots=50, seed=1)
    query = torch.randn(1, 6, 1, 16, device=DEVICE)
    out, lse = fibquant_decode_attention(query, codes_k, codes_v, ck, cv, 0.25)
    want = chunked_attention(query, [(keys, values, None)], 0.25)
    assert rel_error(out, want) < TOLERANCE
    assert (
        rel_error(
            lse,
            dense_lse(query, keys, torch.ones(1, 1, 1, 50, dtype=torch.bool, device=DEVICE), 0.25),
        )
        < 1e-3
    )


@pytest.mark.parametrize(
    ("q_len", "width", "blocks", "dtype"),
    [(1, 1, 2, torch.float16), (3, 40, 2, torch.float16), (1, 33, 0, torch.bfloat16),
     (2, 5, 1, torch.bfloat16)],
    ids=["one-token-window", "window-over-a-tile", "no-block-yet-bf16", "one-block-bf16"],
)  # fmt: skip
def test_fused_attention_over_blocks_and_window_equals_the_concatenation(
    q_len, width, blocks, dtype
):
    """The layer path: one workspace for every block's splits, one epilogue launch for the merge, the fp16
    window (causal among the new tokens), the rotation back and the model's (b, q_len, q_heads, d) layout."""
    from pyramidkv.cache.blocks import CodedBlocks
    from pyramidkv.codecs.registry import make_codecs
    from pyramidkv.kernels.dispatch import fused_attention

    torch.manual_seed(5)
    codecs = make_codecs("fibquant:2", 16)
    coded = CodedBlocks(codecs)
    chunks = []
    shapes = [(37, torch.tensor([[0, 9], [1, 37]], device=DEVICE)), (20, None)][:blocks]
    for slots, lengths in shapes:
        keys = torch.randn(2, 2, slots, 16, device=DEVICE) * 3
        values = torch.randn(2, 2, slots, 16, device=DEVICE)
        coded.add(keys, values, lengths)
        block = coded.blocks[-1]
        visible = None if lengths is None else visible_of(lengths, slots)
        chunks.append(
            (codecs.keys.decode(block.keys, torch.float32),
             codecs.values.decode(block.values, torch.float32), visible)
        )  # fmt: skip
    query = torch.randn(2, 6, q_len, 16, device=DEVICE).to(dtype)
    win_k = torch.randn(2, 2, width, 16, device=DEVICE).to(dtype)
    win_v = torch.randn(2, 2, width, 16, device=DEVICE).to(dtype)
    causal = (
        torch.arange(width, device=DEVICE)
        <= (width - q_len + torch.arange(q_len, device=DEVICE))[:, None]
    )
    out = fused_attention(query, coded, win_k, win_v, 0.25)
    want = chunked_attention(query, [*chunks, (win_k, win_v, causal)], 0.25)
    assert out.dtype == query.dtype and out.shape == (2, q_len, 6, 16)
    # the output is rounded to the query's dtype: 2^-11 (fp16), 2^-8 (bf16)
    assert rel_error(out.transpose(1, 2), want) < max(
        TOLERANCE, 2e-3 if dtype == torch.float16 else 8e-3
    )


@pytest.mark.parametrize("width", [5, 40])
def test_the_epilogue_attends_only_the_window_slots_its_mask_shows(width):
    """A static cache's ring fills in ring order: the window's mask (one per slot, every row alike) hides
    the empty slots; with no split the output is attention over the shown slots alone."""
    from pyramidkv.kernels.epilogue import decode_epilogue

    torch.manual_seed(width)
    query = torch.randn(2, 6, 1, 16, device=DEVICE).to(torch.float16)
    win_k, win_v = (torch.randn(2, 2, width, 16, device=DEVICE).to(torch.float16) for _ in range(2))
    shown = torch.rand(width, device=DEVICE) < 0.6
    shown[width // 2] = True  # the new token's slot
    shown[0] = False
    rotation = torch.eye(16, device=DEVICE)
    workspace = make_workspace(2, 2, 3, 0, 16, DEVICE)
    out = decode_epilogue(workspace, rotation, query, win_k, win_v, 0.25, shown)
    want = chunked_attention(query, [(win_k, win_v, shown.view(1, 1, 1, -1))], 0.25)
    assert rel_error(out.transpose(1, 2), want) < 2e-3  # rounded to fp16
    with pytest.raises(
        ValueError, match=rf"window_visible: expected a bool tensor of shape \({width},\)"
    ):
        decode_epilogue(workspace, rotation, query, win_k, win_v, 0.25, shown.int())


@pytest.mark.parametrize("splits", [3, 20])
def test_the_epilogue_merges_every_split(splits):
    """The log-sum-exp merge of random partials (base-2 maxima, sums, rotated outputs), rotated back, against
    the same merge written in float64 torch; a row one split alone saw."""
    from pyramidkv.kernels.epilogue import decode_epilogue

    torch.manual_seed(splits)
    acc, row_max, row_sum = make_workspace(2, 2, 3, splits, 16, DEVICE)
    acc.copy_(torch.randn_like(acc))
    row_max.copy_(torch.randn_like(row_max) * 4)
    row_max[0, 1, 1:] = float("-inf")  # a row that only one split saw
    row_sum.copy_(torch.rand_like(row_sum) + 0.5)
    rotation = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0].float().to(DEVICE)
    query = torch.randn(2, 6, 1, 16, device=DEVICE)
    window = torch.zeros(2, 2, 0, 16, device=DEVICE)
    out = decode_epilogue((acc, row_max, row_sum), rotation, query, window, window, 0.25)
    weight = torch.exp2(
        row_max.double() - row_max.double().amax(2, keepdim=True)
    )  # (b, kv, split, rows)
    merged = (weight[..., None] * acc.double()).sum(2) / (weight * row_sum.double()).sum(2)[
        ..., None
    ]
    want = (
        (merged @ rotation.double()).reshape(2, 6, 1, 16).transpose(1, 2)
    )  # row g of head h -> h G + g
    assert (out.double() - want).abs().max() < 1e-4


@pytest.mark.parametrize(
    "splits", [4, 12]
)  # one split per loop trip; tiles of splits and a dot per row
def test_rows_no_split_saw_take_the_window_alone_however_low_its_scores(splits):
    """The splits are weighed against their own maximum and rescaled once to the common one; a row no split
    saw (every maximum -inf) must get weight 0 from them, not exp2(0 - max) = inf times 0 when the window's
    scores are far below zero (here -230 in base 2)."""
    from pyramidkv.kernels.epilogue import decode_epilogue

    torch.manual_seed(11)
    acc, row_max, row_sum = make_workspace(1, 2, 3, splits, 16, DEVICE)
    acc.copy_(torch.randn_like(acc))
    row_max.copy_(torch.randn_like(row_max))
    row_max[0, 0] = float("-inf")  # KV head 0: no split saw any of its rows
    row_sum.copy_(torch.rand_like(row_sum) + 0.5)
    query = torch.ones(1, 6, 1, 16, device=DEVICE)
    # q . k = -640: -231 in base 2 at scale 0.25
    win_k = torch.full((1, 2, 5, 16), -40.0, device=DEVICE)
    win_v = torch.randn(1, 2, 5, 16, device=DEVICE)
    rotation = torch.eye(16, device=DEVICE)
    out = decode_epilogue((acc, row_max, row_sum), rotation, query, win_k, win_v, 0.25)
    assert torch.isfinite(out).all()
    # equal scores: the mean of the window's values, for the three query heads of KV head 0
    want = win_v[0, 0].mean(0).expand(3, 16)
    assert (out[0, 0, :3] - want).abs().max() < 1e-5


@pytest.mark.skipif(DEVICE != "cuda", reason="Triton's interpreter specializes nothing: GPU only")
def test_the_epilogue_compiles_once_while_the_window_and_the_splits_grow():
    """A decode step's window width changes every step and its splits with every flush. Triton specializes an
    integer argument equal to 1 or divisible by 16, so each of those would compile another epilogue (~0.7 s in
    the middle of a generation) unless the kernel leaves them unspecialized (epilogue.RUN_LENGTHS)."""
    from pyramidkv.kernels.epilogue import _epilogue_kernel, decode_epilogue

    def compiled() -> int:
        return sum(len(caches[0]) for caches in _epilogue_kernel.device_caches.values())

    torch.manual_seed(3)
    rotation = torch.eye(16, device=DEVICE)
    query = torch.randn(1, 6, 1, 16, device=DEVICE)
    counts = []
    for splits in (2, 16, 17):
        workspace = make_workspace(1, 2, 3, splits, 16, DEVICE)
        for part in workspace:
            part.copy_(torch.rand_like(part) + 0.5)
        for width in (3, 1, 2, 16, 33):
            window = torch.randn(1, 2, width, 16, device=DEVICE)
            out = decode_epilogue(workspace, rotation, query, window, window, 0.25)
            assert torch.isfinite(out).all()
            counts.append(compiled())
    assert counts[1:] == counts[:1] * (len(counts) - 1)


def test_unsupported_codecs_and_arguments_raise():
    ck, cv, codes_k, codes_v, _, _ = make_block(16, 4, 4, batch=1, slots=4)
    query = torch.randn(1, 6, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 16"):
        fibquant_decode_attention(query, codes_k, codes_v, codec(32, 4), cv, 1.0)
    with pytest.raises(TypeError, match="block_size"):
        fibquant_decode_attention(query, codes_k, codes_v, ck, cv, 1.0, block_size=8)
    with pytest.raises(ValueError, match="block"):
        fibquant_decode_attention(query, codes_k, codes_v, ck, cv, 1.0, block=8)
    with pytest.raises(ValueError, match="split"):
        fibquant_decode_attention(query, codes_k, codes_v, ck, cv, 1.0, split=0)
    with pytest.raises(ValueError, match=r"mma_stages must be in 2\.\.8, got 1"):
        fibquant_decode_attention(query, codes_k, codes_v, ck, cv, 1.0, mma_stages=1)
    with pytest.raises(ValueError, match="mma_warps must be one of"):
        fibquant_decode_attention(query, codes_k, codes_v, ck, cv, 1.0, mma_warps=3)
    with pytest.raises(ValueError, match="lengths"):
        fibquant_decode_attention(
            query, codes_k, codes_v, ck, cv, 1.0, torch.ones(2, 2, dtype=torch.long)
        )


@pytest.mark.parametrize(
    "codec_name", ["fibquant:2", "fibquant:3", "turboquant:3", "uniform/fibquant:2"]
)
def test_cache_with_the_fused_kernel_equals_the_torch_reference(codec_name):
    """A quantized cache encoding and decoding through the kernels gives the reference path's logits and tokens."""
    from pyramidkv.cache.compat import cache_kwargs
    from pyramidkv.cache.compressed import CompressedCache
    from pyramidkv.errors import PyramidKVError

    from .conftest import make_tiny

    model = make_tiny("llama", head_dim=16).to(DEVICE)
    ids = torch.arange(3, 50, device=DEVICE).unsqueeze(0)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    results = {}
    for kernel in ("torch", "triton"):
        options = dict(policy="snapkv", budget=12, codec=codec_name, residual=3, kernel=kernel)
        with torch.no_grad(), CompressedCache(model, **options) as cache:
            out = model.generate(
                ids,
                output_logits=True,
                return_dict_in_generate=True,
                **kw,
                **cache_kwargs(model, cache),
            )
        results[kernel] = out
    assert torch.equal(results["torch"].sequences, results["triton"].sequences)
    for a, b in zip(results["torch"].logits, results["triton"].logits, strict=True):
        torch.testing.assert_close(a, b, rtol=TOLERANCE, atol=TOLERANCE)
    with pytest.raises(PyramidKVError, match="kernel"):
        CompressedCache(model, budget=8, codec="kivi:2", kernel="triton")
    auto = CompressedCache(model, budget=8, codec=codec_name)  # auto: the kernel on CUDA only
    assert auto.layers[0]._fused(torch.device("cuda"))
    assert not auto.layers[0]._fused(torch.device("cpu"))
    assert (
        not CompressedCache(model, budget=8, codec="kivi:2").layers[0]._fused(torch.device("cuda"))
    )
    with pytest.raises(PyramidKVError, match="kernel"):
        CompressedCache(model, budget=8, kernel="cuda-magic")


# the kernel's three ways of reading codewords: from global memory, shared flat, shared packed words
GATHERS = pytest.mark.parametrize(
    "gather",
    [
        {"shared_gather": False},
        {"shared_gather": True},
        {"shared_gather": True, "row_gather": True},
    ],
    ids=["global", "shared", "shared-rows"],
)


def _random_codes(codec, shape, scale=1.0):
    """Codes of random vectors (any width of index) and their float32 decoding."""
    x = torch.randn(*shape, codec.d, device=DEVICE) * scale
    codes = codec.encode(x)
    return codes, codec.decode(codes, torch.float32)


@pytest.mark.parametrize(
    ("key_codec", "value_codec"),
    [
        (("fib", 2, 64), ("fib", 2, 64)),  # 3 bits per coordinate: 6-bit indices straddle bytes
        (("fib", 4, 4096), ("fib", 1, 16)),  # 12-bit indices; 4 bits scalar-sized blocks
        (("tq", 2), ("tq", 3)),  # TurboQuant: k = 1, 2- and 3-bit indices
        (("tq", 4), ("fib", 8, 256)),  # 4-bit nibbles; k = 8 at 1 bit per coordinate
    ],
    ids=["fib3bit", "fib12bit-idx", "turboquant2-3", "turboquant4-fibk8"],
)
@GATHERS
def test_any_index_width_and_turboquant(key_codec, value_codec, gather):
    def build(spec):
        return TurboQuant(32, spec[1]) if spec[0] == "tq" else codec(32, spec[1], spec[2])

    ck, cv = build(key_codec), build(value_codec)
    torch.manual_seed(3)
    codes_k, keys = _random_codes(ck, (2, 2, 45), scale=3.0)
    codes_v, values = _random_codes(cv, (2, 2, 45))
    lengths = torch.tensor([[45, 1], [17, 33]], device=DEVICE)
    query = torch.randn(2, 4, 1, 32, device=DEVICE)
    out, _ = fibquant_decode_attention(
        query, codes_k, codes_v, ck, cv, 32**-0.5, lengths, split=2, **gather
    )
    want = chunked_attention(query, [(keys, values, visible_of(lengths, 45))], 32**-0.5)
    assert rel_error(out, want) < TOLERANCE


@GATHERS
@pytest.mark.parametrize("dim", [64, 128])
def test_3_bit_codes_in_planes(gather, dim):
    """Keys and values of 3-bit codes in planes (codecs/planes.py), each coordinate's low bits and high bit read
    from their planes (chunks of one and two 16-coordinate groups), against attention over the decoded codes."""
    ck = cv = TurboQuant(dim, 3, grid="uniform", layout="planes")
    torch.manual_seed(5)
    codes_k, keys = _random_codes(ck, (1, 2, 21), scale=3.0)
    codes_v, values = _random_codes(cv, (1, 2, 21))
    lengths = torch.tensor([[21, 4]], device=DEVICE)
    query = torch.randn(1, 4, 1, dim, device=DEVICE)
    out, _ = fibquant_decode_attention(
        query, codes_k, codes_v, ck, cv, dim**-0.5, lengths, split=2, block=16, **gather
    )
    want = chunked_attention(query, [(keys, values, visible_of(lengths, 21))], dim**-0.5)
    assert rel_error(out, want) < TOLERANCE


@pytest.mark.parametrize(
    "codebook_dtype",
    [
        torch.float32,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(
                DEVICE == "cpu", reason="Triton's interpreter computes bfloat16 dots wrongly"
            ),
        ),
    ],
)
@pytest.mark.parametrize("row_gather", [False, True], ids=["flat", "packed"])
def test_codebook_dtypes_and_blocks(codebook_dtype, row_gather):
    """Packed codewords (row_gather) cut 16- and 32-bit entries out of 32- and 64-bit words."""
    ck, cv, codes_k, codes_v, keys, values = make_block(16, 4, 2, slots=70, seed=4)
    lengths = torch.tensor([[70, 3], [64, 65]], device=DEVICE)
    query = torch.randn(2, 6, 1, 16, device=DEVICE)
    out, _ = fibquant_decode_attention(
        query,
        codes_k,
        codes_v,
        ck,
        cv,
        0.25,
        lengths,
        block=64,
        codebook_dtype=codebook_dtype,
        row_gather=row_gather,
    )
    want = chunked_attention(query, [(keys, values, visible_of(lengths, 70))], 0.25)
    # bf16 keeps 8 mantissa bits: its error is ~4x fp16's
    assert rel_error(out, want) < (TOLERANCE if codebook_dtype == torch.float32 else 3e-2)


def test_auto_falls_back_where_the_kernels_cannot_read_the_codes():
    """A head dim the kernels do not take (24: not a power of two) leaves auto on the torch path everywhere,
    and forcing the kernel names the reason when the cache is built, not at the first decode step."""
    from pyramidkv.cache.compressed import CompressedCache
    from pyramidkv.errors import PyramidKVError

    from .conftest import make_tiny

    model = make_tiny("llama", head_dim=24)
    auto = CompressedCache(model, budget=8, codec="fibquant:2")
    assert not auto.layers[0]._fused(torch.device("cuda"))
    with pytest.raises(PyramidKVError, match="powers of two"):
        CompressedCache(model, budget=8, codec="fibquant:2", kernel="triton")
