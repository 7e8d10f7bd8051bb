"""The quantized cache: eviction composed with FibQuant, TurboQuant and KIVI codes, checked against
decoding everything then attending densely in float64, honest bytes, byte budgets and clear errors."""

from __future__ import annotations

import pytest
import torch

from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.codecs import FibQuant
from pyramidkv.codecs.registry import make_codecs
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.prefill import greedy_rows, prefill

from .conftest import make_tiny

PROMPT = torch.tensor([[1, *range(5, 60)]])  # 56 tokens


@pytest.fixture(autouse=True, scope="module")
def _codebooks_in_tmp(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYRAMIDKV_CACHE_DIR", str(tmp_path_factory.mktemp("codebooks")))
        yield


def run(model, cache, steps=6):
    with torch.no_grad():
        out = model.generate(
            PROMPT,
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            **cache_kwargs(model, cache),
        )
    return out[0, PROMPT.shape[1] :]


def dense_reference(layer, query, scaling):
    """Decode every block whole, concatenate with the fp16 window, one float64 softmax."""
    keys, values, masks = [], [], []
    for k, v, visible in layer.coded.chunks(query.shape[-2], torch.float64):
        keys.append(k)
        values.append(v)
        masks.append(
            torch.ones((*k.shape[:2], 1, k.shape[-2]), dtype=torch.bool)
            if visible is None
            else visible
        )
    keys.append(layer.keys.double())
    values.append(layer.values.double())
    masks.append(torch.ones((*layer.keys.shape[:2], 1, layer.keys.shape[-2]), dtype=torch.bool))
    k, v, m = torch.cat(keys, 2), torch.cat(values, 2), torch.cat(masks, -1)
    group = query.shape[1] // k.shape[1]
    k, v, m = (t.repeat_interleave(group, dim=1) for t in (k, v, m))
    scores = (query.double() @ k.transpose(-1, -2) * scaling).masked_fill(~m, float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize(
    "codec",
    ["fibquant:2", "turboquant:3", "kivi:4", "fibquant:0.75", "uniform:2", "uniform/fibquant"],
)
def test_attention_on_codes_matches_decode_then_dense(tiny_model, codec):
    with CompressedCache(tiny_model, policy="snapkv", budget=20, codec=codec, residual=4) as cache:
        run(
            tiny_model, cache, steps=7
        )  # 6 appended tokens: one block of 4 flushed, 2 in the fp16 window
        layer = cache.layers[1]
        assert [b.tokens for b in layer.coded.blocks][1:] == [4] and layer.keys.shape[-2] == 2
        torch.manual_seed(0)
        query = torch.randn(1, 4, 1, 16)
        got = layer.attend(query, scaling=0.25)
        torch.testing.assert_close(
            got.double(), dense_reference(layer, query, 0.25), rtol=1e-4, atol=1e-5
        )


def test_3_bit_uniform_keys_in_planes_through_the_cache():
    """``uniform:3`` at head dim 64 stores keys in planes (what the CUDA kernel cuts into int8 registers) and
    values as a bit stream; attention on the codes matches decode-then-dense, in as many bytes as the stream."""
    from .conftest import make_tiny

    model = make_tiny("llama", head_dim=64)
    with CompressedCache(model, policy="snapkv", budget=20, codec="uniform:3", residual=4) as cache:
        run(model, cache, steps=7)
        layer = cache.layers[1]
        codecs = layer.coded.codecs
        assert (codecs.keys.layout, codecs.values.layout) == ("planes", "stream")
        block = layer.coded.blocks[0]
        assert block.keys.indices.shape[-1] == block.values.indices.shape[-1] == 24
        torch.manual_seed(0)
        query = torch.randn(1, 4, 1, 64)
        got = layer.attend(query, scaling=0.125)
        torch.testing.assert_close(
            got.double(), dense_reference(layer, query, 0.125), rtol=1e-4, atol=1e-5
        )


def test_codec_none_is_the_eviction_only_cache(tiny_llama):
    with CompressedCache(tiny_llama, policy="pyramidkv", budget=16) as plain:
        a = run(tiny_llama, plain)
        bytes_a = plain.nbytes()
    with CompressedCache(tiny_llama, policy="pyramidkv", budget=16, codec="none") as none:
        assert torch.equal(run(tiny_llama, none), a) and none.nbytes() == bytes_a


def test_more_bits_track_the_full_cache_better(tiny_llama):
    captured = prefill(tiny_llama, PROMPT)
    step = torch.tensor([[9]])
    with torch.no_grad(), captured.cache("full", 8) as full:
        want = tiny_llama(step, **cache_kwargs(tiny_llama, full)).logits
    errors = {}
    for bits in (1, 2, 4):
        with torch.no_grad(), captured.cache("full", 8, codec="fibquant", bits=bits) as cache:
            got = tiny_llama(step, **cache_kwargs(tiny_llama, cache)).logits
        errors[bits] = float((got - want).norm() / want.norm())
    assert errors[4] < errors[2] < errors[1] and errors[4] < 0.05, errors


def test_nbytes_is_codes_norms_lengths_and_codebooks(tiny_llama):
    budget, layers, heads, d = 12, 4, 2, 16
    with (
        torch.no_grad(),
        CompressedCache(
            tiny_llama, policy="snapkv", budget=budget, codec="fibquant", bits=2
        ) as cache,
    ):
        tiny_llama(PROMPT, **cache_kwargs(tiny_llama, cache))
        codec = FibQuant(d, bits=2)
        per_vector = (
            codec.bits_per_coordinate(include_norm=True) * d / 8
        )  # packed indices + fp16 norm
        tables = (
            d * d + codec.n * codec.k
        ) * 4  # one rotation and codebook shared by keys and values
        expected = layers * (2 * heads * budget * per_vector + heads * 8 + heads * d * 4) + tables
        # (one int64 row length per KV head: the ragged prompt block shares the layer's tensor; one key
        # shift of d float32 values per KV head: keys are stored centred)
        assert cache.nbytes() == expected
        report = cache.memory_report()
        assert report["total_bytes"] == cache.nbytes()
        assert report["full_fp16_bytes"] == 2 * layers * heads * PROMPT.shape[1] * d * 2
        assert report["ratio"] < report["ratio_codes_only"]


def test_byte_budget_is_met(tiny_llama):
    limit = 7000
    with (
        torch.no_grad(),
        CompressedCache(
            tiny_llama, policy="pyramidkv", kv_memory=limit, codec="fibquant", bits=2
        ) as cache,
    ):
        tiny_llama(PROMPT, **cache_kwargs(tiny_llama, cache))
        held = cache.nbytes()
        assert held <= limit
        assert (
            held > limit - 4 * cache.token_bytes() - 64
        )  # within one token per layer of the target
    # the byte budget is for the whole batch: two rows share it
    with (
        torch.no_grad(),
        CompressedCache(
            tiny_llama, policy="pyramidkv", kv_memory=limit, codec="fibquant", bits=2
        ) as cache,
    ):
        tiny_llama(PROMPT.repeat(2, 1), **cache_kwargs(tiny_llama, cache))
        assert cache.nbytes() <= limit
        assert cache.nbytes() > limit - 2 * 4 * cache.token_bytes() - 128
    with torch.no_grad(), CompressedCache(tiny_llama, policy="snapkv", kv_memory="25%") as cache:
        tiny_llama(PROMPT, **cache_kwargs(tiny_llama, cache))
        kept = cache.kept_tokens()[:, 0, 0]
        # a share of the full cache in the model's dtype (float32 here): 25% of the prompt's bytes, less
        # the row lengths (4 layers x 2 heads x 8 bytes), in whole float32 tokens of 4 layers
        layer_token = 2 * 2 * 16 * 4  # K and V, 2 KV heads, head dim 16, float32
        want = (0.25 * PROMPT.shape[1] * 4 * layer_token - 4 * 2 * 8) // (4 * layer_token)
        assert kept.float().mean().item() == want
        assert cache.memory_report()["prompt_share"] <= 0.25


def test_batch_with_padding_equals_rows_alone_with_codes():
    model = make_tiny("qwen3")
    rows = [torch.arange(3, 50), torch.arange(7, 30)]
    ids = torch.zeros(2, 47, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 47 - len(r) :], mask[i, 47 - len(r) :] = r, 1
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with (
        torch.no_grad(),
        CompressedCache(model, policy="snapkv", budget=12, codec="fibquant:2", residual=3) as cache,
    ):
        batch = model.generate(ids, attention_mask=mask, **kw, **cache_kwargs(model, cache))[:, 47:]
    for i, r in enumerate(rows):
        with (
            torch.no_grad(),
            CompressedCache(
                model, policy="snapkv", budget=12, codec="fibquant:2", residual=3
            ) as cache,
        ):
            alone = model.generate(r[None], **kw, **cache_kwargs(model, cache))[0, len(r) :]
        assert torch.equal(batch[i], alone)


def test_one_prefill_runner_with_codes_equals_generate(tiny_llama):
    captured = prefill(tiny_llama, PROMPT)
    with captured.cache("pyramidkv", 16, codec="turboquant", bits=2, residual=2) as cache:
        ours = greedy_rows(tiny_llama, cache, captured.logits, 5)[0]
    with CompressedCache(
        tiny_llama, policy="pyramidkv", budget=16, codec="turboquant", bits=2, residual=2
    ) as cache:
        assert ours == run(tiny_llama, cache, steps=5).tolist()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"codec": "nope"}, "codec"),
        ({"codec": "fibquant", "bits": 0.3}, "bits"),
        ({"codec": "kivi", "bits": 2.5}, "bits"),
        ({"codec": "turboquant", "bits": 9}, "bits"),
        ({"codec": "uniform", "bits": 2.5}, "bits"),
        ({"codec": "kivi/fibquant"}, "codec"),
        ({"codec": "uniform/fibquant/turboquant"}, "codec"),
        ({"bits": 2}, "needs a codec"),
        ({"kv_memory": "0"}, "kv_memory"),
        ({"kv_memory": "abc"}, "kv_memory"),
        ({"kv_memory": "150%"}, "kv_memory"),
        ({"policy": "full", "kv_memory": "1MiB"}, "kv_memory"),
        ({"residual": 0}, "residual"),
    ],
)
def test_bad_codec_options(tiny_llama, kwargs, needle):
    with pytest.raises(PyramidKVError, match=needle):
        CompressedCache(tiny_llama, **kwargs)


@pytest.mark.parametrize("codec", ["fibquant:2", "kivi:2"])
def test_reorder_cache_moves_coded_rows_with_the_rest(tiny_llama, codec):
    """Beam search reorders rows: every block of codes must follow, so swapped rows decode as the other row
    did (the reference is the same cache before the swap, decoded through the torch path)."""
    prompts = torch.stack([PROMPT[0], PROMPT[0].flip(0)])
    with (
        torch.no_grad(),
        CompressedCache(tiny_llama, "snapkv", 16, codec=codec, residual=2) as cache,
    ):
        tiny_llama(prompts, **cache_kwargs(tiny_llama, cache))
        for step in (
            [[7], [8]],
            [[9], [10]],
            [[11], [12]],
        ):  # flushes the window into a second block
            tiny_llama(torch.tensor(step), **cache_kwargs(tiny_llama, cache))
        layer = cache.layers[1]
        assert len(layer.coded.blocks) >= 2
        before = [(k.clone(), v.clone()) for k, v, _ in layer.coded.chunks(1, torch.float32)]
        lengths = layer.lengths.clone()
        cache.reorder_cache(torch.tensor([1, 0]))
        after = list(layer.coded.chunks(1, torch.float32))
        for (k0, v0), (k1, v1, _) in zip(before, after, strict=True):
            torch.testing.assert_close(k1, k0.flip(0), rtol=0, atol=0)
            torch.testing.assert_close(v1, v0.flip(0), rtol=0, atol=0)
        assert torch.equal(layer.lengths, lengths.flip(0))
        assert layer.coded.blocks[0].lengths is layer.lengths


@pytest.mark.parametrize("codec", ["fibquant:2", "turboquant:3", "kivi:2"])
def test_flushed_blocks_join_into_one(codec):
    """Flushes of the window join the previous flushed block (per-token codes), so a long generation keeps
    two blocks, not one per flush; the joined block decodes as the flushes did one by one. KIVI's keys are
    grouped across tokens and stay separate blocks."""
    from pyramidkv.cache.blocks import CodedBlocks
    from pyramidkv.codecs.registry import make_codecs

    torch.manual_seed(0)
    codecs = make_codecs(codec, 32)
    coded = CodedBlocks(codecs)
    prompt = torch.randn(2, 2, 10, 32)
    coded.add(prompt, prompt, torch.tensor([[10, 3], [7, 10]]))
    flushes = [torch.randn(2, 2, 32, 32) for _ in range(3)]
    for part in flushes:
        coded.add(part, -part)
    one_by_one = [codecs.keys.decode(codecs.keys.encode(part), torch.float32) for part in flushes]
    per_token = codec != "kivi:2"
    assert [b.tokens for b in coded.blocks] == ([10, 96] if per_token else [10, 32, 32, 32])
    assert coded.tokens == 96
    decoded = [keys for keys, _, _ in coded.chunks(1, torch.float32)][1:]
    torch.testing.assert_close(torch.cat(decoded, 2), torch.cat(one_by_one, 2), rtol=0, atol=0)


def test_a_pair_names_the_key_and_the_value_codec():
    """``keys/values``: uniform-grid TurboQuant keys (what the CUDA kernel reads as int8) and FibQuant values,
    both at the rate given, and a label that says so."""
    pair = make_codecs("uniform/fibquant:2", 64)
    assert (type(pair.keys).__name__, pair.keys.grid, pair.keys.bits) == (
        "TurboQuant",
        "uniform",
        2,
    )
    assert isinstance(pair.values, FibQuant) and pair.values.rate == 2.0
    assert pair.label() == "uniform/fibquant:2"
    assert make_codecs("uniform", 64).keys.grid == "uniform"
