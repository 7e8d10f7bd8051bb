"""Chunked prefill (``prefill_chunk``): a prompt fed in chunks attends exactly as one forward does while nothing
is evicted; otherwise every layer holds at most its budget plus one chunk, StreamingLLM (which selects by
position) keeps exactly the tokens of a one-shot prefill, codes that survive a chunk stay the same codes, and
generation through transformers' chunked prefill, pyramidkv's generate and the graph path agree."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from pyramidkv import CompressedCache
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.errors import PyramidKVError

from .conftest import make_tiny
from .test_eval_runner import context_sensitive_tiny
from .test_generation import _CharTokenizer


def _prompt(model, length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=gen)


def _feed(model, cache, ids, chunk: int, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Logits of every chunk of ``ids`` fed through ``cache``."""
    out = []
    with torch.inference_mode():
        for start in range(0, ids.shape[1], chunk):
            end = min(start + chunk, ids.shape[1])
            seen = None if mask is None else mask[:, :end]
            logits = model(
                ids[:, start:end], attention_mask=seen, **cache_kwargs(model, cache)
            ).logits
            out.append(logits)
    return out


def test_a_planned_cache_holds_its_bytes_after_each_chunk():
    """plan='auto' in chunks: after each chunk the layers plan again from the tokens held and the chunk, and the
    cache holds at most the byte budget of the prompt so far; at a budget that keeps every token whole the
    chunks attend exactly as one forward."""
    from pyramidkv.cache.accounting import full_cache_nbytes

    model = make_tiny("llama")
    ids = _prompt(model, 384)
    cache = CompressedCache(model, "snapkv", kv_memory="12%", plan="auto", prefill_chunk=128)
    with torch.inference_mode():
        for end in range(128, 385, 128):
            model(ids[:, end - 128 : end], **cache_kwargs(model, cache))
            allowed = 0.12 * full_cache_nbytes(model.config, end, 1, model.dtype)
            assert cache.nbytes() <= allowed, (end, cache.nbytes(), allowed)
    rates = {r["bits"] for layer in cache.memory_report()["rates"] for r in layer if r["tokens"]}
    assert len(rates) >= 2  # several rates survived the chunks
    cache.close()
    with torch.inference_mode():
        whole = model(ids).logits
    exact = CompressedCache(  # bytes for every token whole: the planner keeps the prompt
        model, "snapkv", kv_memory=10**8, plan="auto:2+3+4+whole", prefill_chunk=64
    )
    chunked = torch.cat(_feed(model, exact, ids, 64), dim=1)
    assert torch.allclose(chunked, whole, atol=1e-4)
    exact.close()


def test_the_model_mask_of_a_chunk_spans_the_chunk_not_the_prompt(monkeypatch):
    """Memory of a chunk is bounded by the chunk: the 4-D mask transformers builds for it covers the layer's recent
    window and the chunk, not every position seen (which made the mask of the last chunk of a 512k prompt
    2 GB); the padded row still keeps only its own tokens (test_streamingllm_keeps_the_one_shot_tokens)."""
    import pyramidkv.cache.hook as hook

    widths: list[int] = []

    class Recording(hook.ModelAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.mask is not None:
                widths.append(self.mask.shape[-1])

    monkeypatch.setattr(hook, "ModelAttention", Recording)
    model = make_tiny("llama")
    ids = _prompt(model, 600, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :70] = 0
    cache = CompressedCache(model, policy="snapkv", budget=32, prefill_chunk=50)
    _feed(model, cache, ids, 50, mask)
    assert widths and max(widths) <= 50 + cache.layers[0].keys.shape[-2]
    cache.close()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("codec", [None, "fibquant:4"])
def test_chunks_attend_as_one_forward_while_nothing_is_evicted(family, codec):
    model = make_tiny(family)
    ids = _prompt(model, 200)
    with torch.inference_mode():
        whole = model(ids).logits
    cache = CompressedCache(model, policy="snapkv", budget=1000, codec=codec, prefill_chunk=64)
    chunked = torch.cat(_feed(model, cache, ids, 64), dim=1)
    if codec is None:  # the kept tokens are the model's own: exact
        assert torch.allclose(chunked, whole, atol=1e-4)
    else:  # the first chunk is exact, later ones read 4-bit codes of the earlier chunks
        assert torch.allclose(chunked[:, :64], whole[:, :64], atol=1e-4)
        assert (chunked.argmax(-1) == whole.argmax(-1)).float().mean() > 0.9
    assert int(cache.layers[0].kept_tokens().min()) == 200
    cache.close()


@pytest.mark.parametrize(
    "options",
    [
        dict(policy="snapkv", budget=32),
        dict(policy="pyramidkv", budget="10%"),
        dict(policy="h2o", budget=40, codec="fibquant:2"),
        dict(policy="pyramidkv-adaptive", budget="15%"),
    ],
)
def test_every_layer_holds_at_most_its_budget_after_each_chunk(options):
    model = make_tiny("llama")
    ids = _prompt(model, 400)
    cache = CompressedCache(model, prefill_chunk=64, **options)
    with torch.inference_mode():
        for end in range(64, 401, 64):
            start = end - 64
            model(ids[:, start:end], **cache_kwargs(model, cache))
            budgets = cache.layer_budgets(end)
            held = [int(layer.kept_tokens().max()) for layer in cache.layers]
            assert all(
                layer.appended_tokens() == 0 for layer in cache.layers
            )  # the chunk was folded in
            if (
                options["policy"] == "pyramidkv-adaptive"
            ):  # its schedule moves tokens between layers
                assert sum(held) <= sum(budgets), end
            else:
                assert all(h <= b for h, b in zip(held, budgets, strict=True)), (end, held, budgets)
    assert cache.layers[0].seen == 384
    total = sum(cache.layer_budgets(384))
    kept = sum(int(layer.kept_tokens()[0, 0]) for layer in cache.layers)
    if (
        options["policy"] != "pyramidkv-adaptive"
    ):  # the adaptive schedule moves tokens between layers
        assert kept == total
    cache.close()


@pytest.mark.parametrize("codec", [None, "fibquant:3"])
def test_streamingllm_keeps_the_one_shot_tokens(codec):
    model = make_tiny("llama")
    ids = _prompt(model, 300, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :70] = 0  # row 1 left-padded: only its own 230 tokens are candidates
    # keys uncentred: a one-shot prefill centres them on the whole prompt's mean, a chunked one on its first
    # chunk's (test_a_chunked_prefill_centres_keys_on_its_first_chunk), so their codes differ
    plain = {} if codec is None else {"center_keys": False}
    one = CompressedCache(model, policy="streamingllm", budget=64, codec=codec, **plain)
    _feed(model, one, ids, 300, mask)
    chunked = CompressedCache(
        model, policy="streamingllm", budget=64, codec=codec, prefill_chunk=50, **plain
    )
    _feed(model, chunked, ids, 50, mask)
    for a, b in zip(one.layers, chunked.layers, strict=True):
        keys_a, _, held_a = a.held()
        keys_b, _, held_b = b.held()
        assert torch.equal(held_a, held_b)
        if (
            codec and a.layer_idx
        ):  # above layer 0 the chunks read codes of earlier chunks: other states
            continue
        for row in range(2):
            got, want = keys_b[row][:, held_b[row]], keys_a[row][:, held_a[row]]
            assert torch.allclose(got, want, atol=2e-3), (a.layer_idx, row)
    one.close()
    chunked.close()


def test_codes_that_survive_a_chunk_keep_their_own_codes():
    model = make_tiny("llama")
    ids = _prompt(model, 300)
    cache = CompressedCache(
        model, policy="snapkv", budget=64, codec="fibquant:2", prefill_chunk=100
    )
    _feed(model, cache, ids, 100)
    layer = cache.layers[0]
    keys, _, held = layer.held()
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, full))  # layer 0's keys depend on the tokens alone
    codec = cache.codecs.keys
    centred = full.layers[0].keys.float() - layer.key_shift.float()
    # every token's one-shot code, under the shift the cache stores its keys with
    reference = codec.decode(codec.encode(centred), torch.float32) + layer.key_shift.float()
    cache.close()
    # every kept key is exactly the one-shot code of some prompt token (a re-encoded code would shrink)
    for head in range(keys.shape[1]):
        kept = keys[0, head][held[0]]
        distance = torch.cdist(kept.double(), reference[0, head].double()).min(dim=-1).values
        assert float(distance.max()) < 1e-3, head


def test_a_chunked_prefill_centres_keys_on_its_first_chunk():
    """The key shift is taken once, at the first compression: from the first chunk in a chunked prefill, so it
    equals the shift of a one-forward prefill of that chunk alone, and it is kept after every later chunk."""
    model = make_tiny("llama")
    ids = _prompt(model, 300, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :70] = 0  # row 1 left-padded: its pads do not enter its shift
    chunked = CompressedCache(model, "snapkv", 64, codec="fibquant:3", prefill_chunk=100)
    _feed(model, chunked, ids, 100, mask)
    first = CompressedCache(model, "snapkv", 64, codec="fibquant:3")
    _feed(model, first, ids[:, :100], 100, mask[:, :100])
    whole = CompressedCache(model, "snapkv", 64, codec="fibquant:3")
    _feed(model, whole, ids, 300, mask)
    for a, b, c in zip(chunked.layers, first.layers, whole.layers, strict=True):
        torch.testing.assert_close(a.key_shift, b.key_shift, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a.key_shift, c.key_shift, atol=1e-3)
    for cache in (chunked, first, whole):
        cache.close()


def test_generation_agrees_through_every_chunked_path():
    from pyramidkv.generation import generate

    model = context_sensitive_tiny()
    tok = _CharTokenizer()
    prompt = "".join(chr(97 + i % 26) for i in range(250))
    runs = {}
    for name, options in {
        "eager": dict(),
        "graph": dict(cuda_graph=True),
        "argument": dict(prefill_chunk=60),
    }.items():
        chunk = None if name == "argument" else 60
        cache = CompressedCache(model, policy="snapkv", budget=48, prefill_chunk=chunk)
        runs[name] = generate(model, tok, prompt, max_new_tokens=6, cache=cache, **options)
        cache.close()
    assert runs["eager"].token_ids == runs["graph"].token_ids
    assert runs["argument"].token_ids == runs["eager"].token_ids
    full = generate(model, tok, prompt, max_new_tokens=6, cache=DynamicCache(config=model.config))
    covered = CompressedCache(model, policy="snapkv", budget=1000, prefill_chunk=60)
    assert generate(model, tok, prompt, max_new_tokens=6, cache=covered).token_ids == full.token_ids
    covered.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(prefill_chunk=0), "prefill_chunk"),
        (dict(prefill_chunk="4k"), "prefill_chunk"),
        (dict(policy="adakv", prefill_chunk=64), "prefill_chunk: policy 'adakv' shares"),
        (dict(codec="kivi:2", prefill_chunk=64), "prefill_chunk: not with codec 'kivi'"),
        (
            dict(budget=None, kv_memory="5%", plan="auto", decode_budget=64),
            "decode_budget: not with plan='auto'",
        ),
    ],
)
def test_bad_chunks_are_refused(options, message):
    with pytest.raises(PyramidKVError, match=message):
        CompressedCache(make_tiny("llama"), **{"policy": "snapkv", "budget": 32, **options})


def _kept_keys(cache) -> list[torch.Tensor]:
    """Each layer's held keys of row 0, KV head 0, in position order."""
    found = []
    for layer in cache.layers:
        keys, _, held = layer.held()
        found.append(keys[0, 0][held[0]])
    return found


def test_a_headroom_that_holds_the_prompt_selects_as_one_shot():
    """With headroom for the whole prompt nothing is evicted during the chunks, and the budget selected when
    the prefill ends, scored by the last chunk's window, is the one-shot prefill's; without headroom the
    chunks' own windows choose other tokens."""
    model = make_tiny("llama")
    ids = _prompt(model, 256)
    options = dict(policy="snapkv", budget=32)
    one = CompressedCache(model, **options)
    _feed(model, one, ids, 256)
    roomy = CompressedCache(model, prefill_chunk=64, prefill_headroom=8, **options)
    _feed(model, roomy, ids, 64)
    assert [int(layer.kept_tokens().max()) for layer in roomy.layers] == [256] * len(roomy.layers)
    roomy.end_chunked_prefill()
    tight = CompressedCache(model, prefill_chunk=64, **options)
    _feed(model, tight, ids, 64)
    want = _kept_keys(one)
    for got, expected in zip(_kept_keys(roomy), want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert any(
        got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-4)
        for got, expected in zip(_kept_keys(tight), want, strict=True)
    )
    for cache in (one, roomy, tight):
        cache.close()


def test_the_headroom_is_held_through_the_chunks_and_the_first_token_ends_it():
    model = make_tiny("llama")
    ids = _prompt(model, 321)
    cache = CompressedCache(
        model, policy="pyramidkv", budget=24, prefill_chunk=50, prefill_headroom=3
    )
    with torch.inference_mode():
        for start in range(0, 320, 50):
            end = min(start + 50, 320)
            model(ids[:, start:end], **cache_kwargs(model, cache))
            held = [int(layer.kept_tokens().max()) for layer in cache.layers]
            roomy = cache.layers[0].chunk_selection.layer_budgets(end)
            assert sum(roomy) == len(roomy) * min(end, 3 * 24)  # three times the average budget
            assert held == roomy, (end, held, roomy)
        assert any(int(layer.kept_tokens().max()) > 24 for layer in cache.layers)
        model(ids[:, 320:], **cache_kwargs(model, cache))  # the first generated token
    held = [int(layer.kept_tokens().max()) for layer in cache.layers]
    assert all(layer.appended_tokens() == 1 for layer in cache.layers)
    assert held == [b + 1 for b in cache.layer_budgets(320)]  # the budget and the new token
    cache.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(prefill_headroom=2), "prefill_headroom: got 2, which holds more"),
        (dict(prefill_chunk=64, prefill_headroom=0.5), "prefill_headroom: got 0.5; expected"),
        (
            dict(budget=None, kv_memory="5%", plan="auto", prefill_chunk=64, prefill_headroom=2),
            "prefill_headroom: got 2 with plan",
        ),
    ],
)
def test_bad_headroom_is_refused(options, message):
    with pytest.raises(PyramidKVError, match=message):
        CompressedCache(make_tiny("llama"), **{"policy": "snapkv", "budget": 32, **options})
