"""CompressedCache against the full uncompressed cache: identical when nothing is evicted, honest bytes,
positions that continue from the prompt's length, batches equal to rows alone, and no lasting side effects."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import DynamicCache

from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.cache.hook import installed
from pyramidkv.cache.protocol import decode_backends
from pyramidkv.errors import PyramidKVError, UnsupportedModelError
from pyramidkv.policies import POLICY_NAMES

from .conftest import make_tiny

PROMPT = torch.tensor([[1, *range(5, 45)]])  # 41 tokens


def greedy(model, ids, cache, steps=8, **kw):
    kw.setdefault("do_sample", False)
    out = model.generate(
        ids,
        max_new_tokens=steps,
        eos_token_id=None,
        pad_token_id=0,
        **cache_kwargs(model, cache),
        **kw,
    )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_budget_above_prompt_is_token_identical_to_dynamic_cache(tiny_model, policy):
    reference = greedy(tiny_model, PROMPT, DynamicCache(config=tiny_model.config))
    with CompressedCache(tiny_model, policy=policy, budget=PROMPT.shape[1] + 5) as cache:
        assert torch.equal(greedy(tiny_model, PROMPT, cache), reference)


def test_logits_identical_when_nothing_is_evicted(tiny_llama):
    ids = PROMPT
    full = DynamicCache(config=tiny_llama.config)
    with torch.no_grad(), CompressedCache(tiny_llama, policy="pyramidkv", budget="100%") as cache:
        a = tiny_llama(ids, **cache_kwargs(tiny_llama, full)).logits
        b = tiny_llama(ids, **cache_kwargs(tiny_llama, cache)).logits
        assert torch.equal(a, b)
        step = torch.tensor([[7]])
        a = tiny_llama(step, **cache_kwargs(tiny_llama, full)).logits
        b = tiny_llama(step, **cache_kwargs(tiny_llama, cache)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_decode_attends_to_kept_tokens_at_original_positions(tiny_llama):
    """StreamingLLM keeps the same tokens in every head, so a full cache with the evicted positions masked out
    of a 2-D attention mask is an independent reference; positions continue from the prompt length."""
    n, budget, sinks = PROMPT.shape[1], 16, 4
    with (
        torch.no_grad(),
        CompressedCache(tiny_llama, policy="streamingllm", budget=budget) as cache,
    ):
        tiny_llama(PROMPT, **cache_kwargs(tiny_llama, cache))
        assert cache.get_seq_length() == n
        step = torch.tensor([[11]])
        got = tiny_llama(step, **cache_kwargs(tiny_llama, cache)).logits
    full = DynamicCache(config=tiny_llama.config)
    with torch.no_grad():
        tiny_llama(PROMPT, **cache_kwargs(tiny_llama, full))
        keep = torch.zeros(1, n + 1, dtype=torch.long)
        keep[0, :sinks] = 1
        keep[0, n - (budget - sinks) :] = 1
        want = tiny_llama(
            step,
            attention_mask=keep,
            position_ids=torch.tensor([[n]]),
            **cache_kwargs(tiny_llama, full),
        ).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["pyramidkv", "snapkv", "h2o", "streamingllm", "random"])
def test_batch_with_left_padding_equals_rows_alone(policy):
    model = make_tiny("qwen2")
    rows = [torch.arange(3, 60), torch.arange(10, 40)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    with CompressedCache(model, policy=policy, budget=20) as cache:
        batch = greedy(model, ids, cache, attention_mask=mask)
        kept = cache.kept_tokens()
    for i, r in enumerate(rows):
        with CompressedCache(model, policy=policy, budget=20) as cache:
            alone = greedy(model, r.unsqueeze(0), cache)
            assert torch.equal(
                kept[:, i], cache.kept_tokens()[:, 0]
            )  # padding never kept, own budget
        assert torch.equal(batch[i], alone[0]), f"row {i}"


def test_nbytes_is_the_stored_tensors_and_shrinks_by_the_budget(tiny_llama):
    n, budget = PROMPT.shape[1], 10
    layers, kv_heads, head_dim = 4, 2, 16
    with torch.no_grad(), CompressedCache(tiny_llama, policy="snapkv", budget=budget) as cache:
        tiny_llama(PROMPT, **cache_kwargs(tiny_llama, cache))
        stored = sum(
            t.numel() * t.element_size() for layer in cache.layers for t in layer.tensors()
        )
        assert cache.nbytes() == stored
        kv = 2 * layers * kv_heads * budget * head_dim * 4
        assert (
            cache.nbytes() == kv + layers * kv_heads * 8
        )  # float32 keys/values plus int64 row lengths
        full = DynamicCache(config=tiny_llama.config)
        tiny_llama(PROMPT, **cache_kwargs(tiny_llama, full))
        full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
        assert full_bytes / kv == pytest.approx(n / budget)


@pytest.mark.parametrize("after", ["forward", "layer"])
@pytest.mark.parametrize("codec", [None, "fibquant:2"])
def test_nothing_held_keeps_the_prompt_alive(tiny_llama, codec, after):
    """Every byte allocated behind what the layers hold is counted by them: no view (the empty recent window,
    say) keeps the whole prompt's keys and values allocated behind it. Layers compressed together share one
    allocation of kept tokens, each holding its own part."""
    with (
        torch.no_grad(),
        CompressedCache(tiny_llama, "snapkv", 10, codec=codec, compress_after=after) as cache,
    ):
        tiny_llama(PROMPT, **cache_kwargs(tiny_llama, cache))
        held = [t for layer in cache.layers for t in [layer.keys, layer.values, *layer.tensors()]]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
        counted = {id(t): t.nbytes for t in held}  # the keys and values are among the tensors too
        assert sum(storages.values()) == sum(counted.values())


def test_pyramid_keeps_fewer_tokens_in_deeper_layers():
    model = make_tiny("llama", num_hidden_layers=6)
    ids = torch.arange(3, 90).unsqueeze(0)
    with torch.no_grad(), CompressedCache(model, policy="pyramidkv", budget=24) as cache:
        model(ids, **cache_kwargs(model, cache))
        per_layer = cache.kept_tokens()[:, 0, 0].tolist()
        assert per_layer == cache.layer_budgets(ids.shape[1])
        assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] > per_layer[-1]
        assert sum(per_layer) == 24 * 6
        # the observation window (the last prompt tokens) is kept in every layer and head
        window = cache.policy.window
        full = DynamicCache(config=model.config)
        model(ids, **cache_kwargs(model, full))
        for layer, ref in zip(cache.layers, full.layers, strict=True):
            n_kept = layer.lengths[0, 0]
            torch.testing.assert_close(
                layer.kept_keys[0, :, n_kept - window : n_kept], ref.keys[0, :, -window:]
            )


def test_context_only_mode_appends_the_question_uncompressed(tiny_llama):
    context, question = PROMPT[:, :30], PROMPT[:, 30:]
    reference = greedy(tiny_llama, PROMPT, DynamicCache(config=tiny_llama.config))
    with torch.no_grad(), CompressedCache(tiny_llama, policy="snapkv", budget=64) as cache:
        tiny_llama(context, **cache_kwargs(tiny_llama, cache))
        out = greedy(tiny_llama, torch.cat([context, question], dim=1), cache)
    assert torch.equal(out, reference)
    with torch.no_grad(), CompressedCache(tiny_llama, policy="snapkv", budget=8) as cache:
        tiny_llama(context, **cache_kwargs(tiny_llama, cache))
        greedy(tiny_llama, torch.cat([context, question], dim=1), cache, steps=3)
        # the context is compressed to the budget; the question and two generated tokens are appended whole
        assert cache.kept_tokens()[0, 0, 0].item() == 8 + question.shape[1] + 2


def test_sampling_matches_dynamic_cache_when_nothing_is_evicted(tiny_llama):
    def sample(cache):
        torch.manual_seed(3)
        return greedy(tiny_llama, PROMPT, cache, do_sample=True, top_k=0, temperature=1.0)

    with CompressedCache(tiny_llama, policy="h2o", budget=100) as cache:
        assert torch.equal(sample(cache), sample(DynamicCache(config=tiny_llama.config)))


def test_no_lasting_side_effect(tiny_llama):
    assert tiny_llama.config._attn_implementation == "sdpa"
    with CompressedCache(tiny_llama, budget=8):
        assert tiny_llama.config._attn_implementation != "sdpa" and installed(tiny_llama)
    assert tiny_llama.config._attn_implementation == "sdpa" and not installed(tiny_llama)
    cache = CompressedCache(tiny_llama, budget=8)
    del cache
    gc.collect()
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_decode_backends_turn_cudnn_off_for_cuda_only_and_only_when_it_is_on():
    """cuDNN's SDPA plans per key length, so decode over ragged layers turns it off (flags only: no GPU
    needed); where it is already off (the caller wrapped its whole decode) the context does nothing and
    leaves the caller's other choices, here flash attention off, as they are."""
    cuda = torch.device("cuda")
    flags = torch.backends.cuda
    before = (flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled())
    try:
        flags.enable_cudnn_sdp(True)
        with decode_backends(cuda):
            assert not flags.cudnn_sdp_enabled() and flags.flash_sdp_enabled()
        assert flags.cudnn_sdp_enabled()
        with decode_backends(torch.device("cpu")):
            assert flags.cudnn_sdp_enabled()
        flags.enable_cudnn_sdp(False)
        flags.enable_flash_sdp(False)
        with decode_backends(cuda):
            assert not flags.flash_sdp_enabled() and not flags.cudnn_sdp_enabled()
    finally:
        flags.enable_cudnn_sdp(before[0])
        flags.enable_flash_sdp(before[1])


def test_two_caches_on_one_model_restore_once_both_are_gone(tiny_llama):
    a = CompressedCache(tiny_llama, budget=8)
    b = CompressedCache(tiny_llama, budget=8)
    a.close()
    assert installed(tiny_llama)
    b.close()
    assert not installed(tiny_llama)


def test_model_whose_attention_cannot_be_hooked(tiny_llama):
    tiny_llama._supports_attention_backend = False
    with pytest.raises(UnsupportedModelError, match="AttentionInterface"):
        CompressedCache(tiny_llama, budget=8)


def test_layer_kinds_other_than_full_and_sliding_are_refused():
    model = make_tiny("llama")
    model.config.layer_types = ["full_attention", "chunked_attention"] * 2
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        CompressedCache(model, budget=8)


@pytest.mark.parametrize("budget", [0, -5, "0%", "150%", "abc", float("nan")])
def test_bad_budgets(tiny_llama, budget):
    with pytest.raises(ValueError, match="budget"):
        CompressedCache(tiny_llama, budget=budget)


def test_unknown_policy_lists_the_known_ones(tiny_llama):
    with pytest.raises(ValueError, match="snapkv"):
        CompressedCache(tiny_llama, policy="nope", budget=8)


@pytest.mark.parametrize("codec", [None, "fibquant:2"])
@pytest.mark.parametrize("share", ["50%", "20%", "7%"])
def test_a_kv_memory_share_is_what_the_prompt_holds(tiny_llama, share, codec):
    """``kv_memory="20%"`` is a share of the prompt's full cache in the model's dtype (float32 here), and the
    compressed prompt holds it to within one token per layer: every byte counted, codebooks and lengths too
    (or the whole prompt, when its codes take less)."""
    asked = float(share.rstrip("%")) / 100
    ids = torch.randint(3, 97, (1, 200), generator=torch.Generator().manual_seed(2))
    with (
        torch.no_grad(),
        CompressedCache(tiny_llama, "pyramidkv", kv_memory=share, codec=codec) as cache,
    ):
        tiny_llama(ids, **cache_kwargs(tiny_llama, cache))
        report = cache.memory_report()
        assert (
            report["prompt_full_bytes"] == 4 * 200 * 2 * 2 * 16 * 4
        )  # layers x tokens x K,V x heads x dim x fp32
        assert report["prompt_bytes"] == cache.nbytes()  # nothing generated yet
        one_token_per_layer = 4 * cache.token_bytes() / report["prompt_full_bytes"]
        if bool(
            (cache.kept_tokens() == 200).all()
        ):  # the share holds more than the whole prompt's codes
            assert report["prompt_share"] <= asked and codec is not None
        else:
            assert asked - one_token_per_layer <= report["prompt_share"] <= asked


def test_a_kv_memory_below_the_smallest_cache_says_by_how_much(tiny_llama):
    ids = torch.randint(3, 97, (1, 50))
    with (
        torch.no_grad(),
        CompressedCache(tiny_llama, "snapkv", kv_memory=100) as cache,
        pytest.raises(
            PyramidKVError, match=r"kv_memory: 100 bytes is less than the smallest .* short"
        ),
    ):
        tiny_llama(ids, **cache_kwargs(tiny_llama, cache))


def test_a_second_prompt_through_a_used_cache_is_refused_and_reset_starts_over(tiny_llama):
    tiny_llama.generation_config.eos_token_id = None
    first, second = torch.randint(3, 97, (1, 35)), torch.randint(3, 97, (1, 30))
    with CompressedCache(tiny_llama, "snapkv", 8) as cache:
        tiny_llama.generate(first, max_new_tokens=2, **cache_kwargs(tiny_llama, cache))
        with pytest.raises(PyramidKVError, match="holds one sequence"):
            tiny_llama.generate(second, max_new_tokens=2, **cache_kwargs(tiny_llama, cache))
        cache.reset()
        out = tiny_llama.generate(second, max_new_tokens=2, **cache_kwargs(tiny_llama, cache))
    with CompressedCache(tiny_llama, "snapkv", 8) as fresh:
        want = tiny_llama.generate(second, max_new_tokens=2, **cache_kwargs(tiny_llama, fresh))
    assert torch.equal(out, want) and cache.get_seq_length() == 31
