"""generate(): token counts, greedy equality with a hand-written loop, and honest KV byte counts."""

from __future__ import annotations

import pytest
import torch

from pyramidkv.cache.accounting import cache_nbytes, full_cache_nbytes
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.errors import PyramidKVError
from pyramidkv.generation import prompt_ids


class _CharTokenizer:
    """Just enough of a tokenizer for generate(): ids are byte values folded into a tiny vocabulary."""

    chat_template = None
    eos_token_id = 2

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([[3 + (b % 90) for b in text.encode()]])}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i % 90) for i in ids)


def _greedy_by_hand(model, ids, steps):
    out = ids
    for _ in range(steps):
        logits = model(out).logits[:, -1]
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out[0, ids.shape[1] :].tolist()


def test_generate_matches_a_plain_greedy_loop(tiny_model):
    from pyramidkv.generation import generate

    tiny_model.generation_config.eos_token_id = None
    tok = _CharTokenizer()
    result = generate(tiny_model, tok, "hello world, a prompt", max_new_tokens=6)
    ids = prompt_ids(tok, "hello world, a prompt")
    with torch.no_grad():
        assert result.token_ids == _greedy_by_hand(tiny_model, ids, 6)
    assert result.new_tokens == 6 and result.prompt_tokens == ids.shape[1]
    # A DynamicCache holds the prompt and every new token but the last: the formula must agree with it.
    assert result.kv_bytes == result.full_kv_bytes > 0


def test_full_cache_formula_against_tensors(tiny_llama):
    from transformers import DynamicCache

    cache = DynamicCache(config=tiny_llama.config)
    with torch.no_grad():
        tiny_llama(torch.arange(3, 20).unsqueeze(0).repeat(2, 1), **cache_kwargs(tiny_llama, cache))
    assert cache_nbytes(cache) == full_cache_nbytes(
        tiny_llama.config, 17, batch=2, dtype=torch.float32
    )


@pytest.mark.parametrize("bad", [0, -3])
def test_max_new_tokens_must_be_positive(tiny_llama, bad):
    from pyramidkv.generation import generate

    with pytest.raises(PyramidKVError, match="max_new_tokens"):
        generate(tiny_llama, _CharTokenizer(), "x", max_new_tokens=bad)


def test_empty_prompt_is_rejected():
    with pytest.raises(PyramidKVError, match="prompt"):
        prompt_ids(_CharTokenizer(), "   ")


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
        ),
    ],
)
@pytest.mark.parametrize("codec", [None, "fibquant:3"])
def test_graph_generation_keeps_a_decode_budget(tiny_llama, device, codec):
    """cuda_graph=True over a cache with a decode budget: the static layers select again every compress_every
    steps (between replays of the captured step on a GPU; eagerly on the CPU) and give model.generate's greedy
    tokens; with codes the store keeps the survivors' codes and the ring the interval's tokens."""
    from pyramidkv.cache.compressed import CompressedCache
    from pyramidkv.generation import generate

    tiny_llama.to(device).generation_config.eos_token_id = None
    tok, prompt = (
        _CharTokenizer(),
        "a prompt long enough that a budget of twenty evicts most of it " * 2,
    )

    def cache():
        return CompressedCache(
            tiny_llama, "snapkv", 20, decode_budget=20, compress_every=8, codec=codec, residual=8
        )

    want = generate(tiny_llama, tok, prompt, max_new_tokens=40, cache=cache())
    got = generate(tiny_llama, tok, prompt, max_new_tokens=40, cache=cache(), cuda_graph=True)
    assert got.token_ids == want.token_ids and got.new_tokens == 40


@pytest.mark.parametrize(
    "spec",
    [None, ("pyramidkv", "8", "none"), ("snapkv", "50%", "fibquant:2")],
    ids=["full", "pyramidkv", "snapkv+fibquant"],
)
def test_graph_generation_gives_the_tokens_of_generate(tiny_model, spec):
    """cuda_graph=True prefills, then decodes over a static copy of the cache (on the CPU the captured step runs
    eagerly): the same greedy tokens as model.generate over the cache itself, for the full cache, an
    evicting one and one holding codes (fewer new tokens than its 64-token window: no token is coded yet)."""
    from pyramidkv.cache.compressed import CompressedCache
    from pyramidkv.generation import generate

    tiny_model.generation_config.eos_token_id = None
    tok, prompt = _CharTokenizer(), "a prompt long enough that a budget of eight evicts most of it"

    def cache():
        if spec is None:
            return None
        policy, budget, codec = spec
        return CompressedCache(tiny_model, policy, budget, codec=codec)

    want = generate(tiny_model, tok, prompt, max_new_tokens=7, cache=cache())
    got = generate(tiny_model, tok, prompt, max_new_tokens=7, cache=cache(), cuda_graph=True)
    assert got.token_ids == want.token_ids and got.new_tokens == 7
    assert got.kv_bytes > 0 and got.prompt_tokens == want.prompt_tokens
    # the static copy holds what the cache itself holds after model.generate: kept prompt + 6 fed back
    assert got.held_tokens == want.held_tokens and (want.held_tokens is None) == (spec is None)


def test_graph_generation_stops_on_a_stop_token_and_refuses_sampling(tiny_llama):
    from pyramidkv.generation import generate

    tok, prompt = _CharTokenizer(), "stop somewhere"
    tiny_llama.generation_config.eos_token_id = None
    free = generate(tiny_llama, tok, prompt, max_new_tokens=6).token_ids
    tiny_llama.generation_config.eos_token_id = [free[2]]
    stopped = generate(tiny_llama, tok, prompt, max_new_tokens=6, cuda_graph=True).token_ids
    assert stopped == free[: free.index(free[2]) + 1]  # up to the first stop token, included
    with pytest.raises(PyramidKVError, match="cuda_graph"):
        generate(tiny_llama, tok, prompt, max_new_tokens=3, do_sample=True, cuda_graph=True)


def test_min_new_tokens_suppresses_stop_tokens_as_transformers_does(tiny_llama):
    from pyramidkv.generation import generate

    tok, prompt = _CharTokenizer(), "keep going"
    tiny_llama.generation_config.eos_token_id = None
    free = generate(tiny_llama, tok, prompt, max_new_tokens=8).token_ids
    stop = free[0]
    tiny_llama.generation_config.eos_token_id = [stop]
    assert generate(tiny_llama, tok, prompt, max_new_tokens=8).token_ids == [stop]
    for least in (3, 8):
        eager = generate(tiny_llama, tok, prompt, max_new_tokens=8, min_new_tokens=least)
        graph = generate(
            tiny_llama, tok, prompt, max_new_tokens=8, min_new_tokens=least, cuda_graph=True
        )
        assert graph.token_ids == eager.token_ids  # the graph path suppresses as transformers does
        assert len(eager.token_ids) >= least and stop not in eager.token_ids[:least]
    with pytest.raises(
        PyramidKVError, match=r"min_new_tokens: must be an integer in \[0, max_new_tokens=8\]"
    ):
        generate(tiny_llama, tok, prompt, max_new_tokens=8, min_new_tokens=9)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_model_generate_takes_the_cache_under_either_keyword(tiny_llama, keyword):
    """transformers 5.24+ names the argument ``cache=`` and still accepts ``past_key_values=`` (with a
    deprecation warning): both reach the compressed cache, which then holds the kept prompt and the new
    tokens, and both give the greedy tokens of the other."""
    import inspect
    import warnings

    from pyramidkv import CompressedCache

    if "cache" not in inspect.signature(type(tiny_llama).forward).parameters:
        pytest.skip("this transformers release takes past_key_values= only")
    tiny_llama.generation_config.eos_token_id = None
    ids = torch.randint(
        0, tiny_llama.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3)
    )
    tokens = {}
    for name in ("cache", "past_key_values"):
        with CompressedCache(tiny_llama, "snapkv", 8) as cache, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            out = tiny_llama.generate(ids, max_new_tokens=5, do_sample=False, **{name: cache})
            # 8 kept prompt tokens per layer, then the 4 new tokens fed back (the last is never fed)
            assert cache.kept_tokens().float().mean() == 8 + 4, name
            tokens[name] = out[0, 40:].tolist()
    assert tokens[keyword] == tokens["cache"]
