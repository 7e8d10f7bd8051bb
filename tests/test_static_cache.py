"""StaticCompressedCache against the caches it is built from: the same logits step after step.

The references are independent code paths: a CompressedCache decodes by concatenating its recent window and
calling transformers' SDPA with a mask of the kept lengths; a DynamicCache by concatenating everything. The
static cache writes into preallocated buffers at a device-side step and masks by comparing a precomputed
slot order with that step. A replayed CUDA graph runs none of the step's Python, so the host state it sees
is the one of capture time: the replay test freezes the host counters there and decodes on.
"""

from __future__ import annotations

import contextvars

import pytest
import torch
from transformers import DynamicCache

from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.cache.hook import installed
from pyramidkv.static.buffers import StaticBufferLayer
from pyramidkv.static.cache import DecodeStep, StaticCompressedCache
from pyramidkv.static.split_attention import ALIGN, DECODE_ROWS

from .conftest import make_tiny

ROWS = (
    60,
    45,
    52,
)  # real tokens per row, left-padded: per-row budgets differ under a fractional budget
STEPS = 6


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(ROWS)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(ROWS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(ROWS):
        ids[i, width - n :] = torch.randint(3, 97, (n,), generator=generator)
        mask[i, width - n :] = 1
    return ids, mask


def _prefill(model, cache) -> torch.Tensor:
    ids, mask = _batch()
    return model(ids, attention_mask=mask, **cache_kwargs(model, cache)).logits[:, -1]


def _greedy(model, cache, logits: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """(steps, batch, vocab) logits of greedy decoding by plain forward calls, starting from ``logits``."""
    out = []
    for _ in range(steps):
        logits = model(logits.argmax(-1, keepdim=True), **cache_kwargs(model, cache)).logits[:, -1]
        out.append(logits)
    return torch.stack(out)


def _model(family: str, dtype: torch.dtype):
    return make_tiny(family).to(dtype)


@pytest.mark.parametrize(
    "family,policy,dtype",
    [
        ("llama", "pyramidkv", torch.float64),
        ("llama", "snapkv", torch.float64),
        ("qwen2", "pyramidkv", torch.float64),
        ("qwen2", "snapkv", torch.float64),
        ("qwen2", "pyramidkv", torch.float32),
    ],
)
def test_greedy_decoding_equals_the_compressed_cache(family, policy, dtype):
    model = _model(family, dtype)
    with torch.no_grad(), CompressedCache(model, policy, "30%") as source:
        first = _prefill(model, source)
        lengths = [layer.lengths for layer in source.layers]
        # the premise: rows of different kept lengths, and (pyramidkv) layers of different widths
        assert any(bool((n != n.max()).any()) for n in lengths)
        if policy == "pyramidkv":
            assert len({int(n.max()) for n in lengths}) > 1
        with StaticCompressedCache(model, source, max_new_tokens=STEPS) as static:
            got = _greedy(model, static, first)
            capacities = [(layer.keys.shape[-2], layer.chunk) for layer in static.layers]
        want = _greedy(model, source, first)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for (capacity, chunk), n in zip(capacities, lengths, strict=True):
        needed = int(n.max()) + STEPS
        assert chunk % ALIGN == 0 and capacity % chunk == 0 and needed <= capacity < needed + chunk


def test_full_cache_from_a_dynamic_cache_decodes_like_it():
    model = _model("llama", torch.float64)
    ids = _batch()[0][:, -40:]  # no padding: a DynamicCache is taken whole
    with torch.no_grad():
        source = DynamicCache(config=model.config)
        first = model(ids, **cache_kwargs(model, source)).logits[:, -1]
        with StaticCompressedCache(model, source, max_new_tokens=STEPS) as static:
            assert installed(model)
            got = _greedy(model, static, first)
        assert not installed(model)  # closing the static cache restores the model's attention
        want = _greedy(model, source, first)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_tokens_appended_before_the_build_and_several_at_once():
    """The source already decoded two tokens (its recent window), and three tokens arrive in one forward:
    causal among themselves, attending to kept and appended tokens."""
    model = _model("qwen2", torch.float64)
    question = torch.randint(3, 97, (len(ROWS), 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), CompressedCache(model, "pyramidkv", "30%") as source:
        _greedy(model, source, _prefill(model, source), steps=2)
        with StaticCompressedCache(model, source, max_new_tokens=3 + STEPS) as static:
            got = model(question, **cache_kwargs(model, static)).logits
            got_more = _greedy(model, static, got[:, -1])
        want = model(question, **cache_kwargs(model, source)).logits
        want_more = _greedy(model, source, want[:, -1])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_more, want_more, rtol=1e-10, atol=1e-10)


def test_the_step_replays_with_the_host_state_of_capture_time():
    """What a CUDA graph does, on the CPU: warm up, rewind, run the step once ("capture"), rewind; then before
    every later call put the host counters back to their capture-time values (a replay runs no Python) and
    feed each greedy token through the fixed input buffer. The logits must be eager decoding's."""
    model = _model("llama", torch.float64)
    with torch.no_grad(), CompressedCache(model, "pyramidkv", "30%") as source:
        first = _prefill(model, source)
        with StaticCompressedCache(model, source, max_new_tokens=STEPS) as static:
            got = replay_on_the_cpu(model, static, first.argmax(-1, keepdim=True), STEPS)
        want = _greedy(model, source, first)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def replay_on_the_cpu(model, static, token: torch.Tensor, steps: int) -> torch.Tensor:
    """A CUDA graph's life on the CPU: two warm-up steps, rewind, one "capture" step, rewind; then ``steps``
    greedy steps from ``token`` through the fixed input buffer, the host counters put back before each to
    their capture-time values (a replay runs no Python). The (steps, batch, vocab) logits."""
    step = DecodeStep(model, static)
    step.input_ids.copy_(token)
    for _ in range(2):  # warm-up
        step()
    static.rewind(0)
    frozen = [(layer.appended, layer.seen) for layer in static.layers]
    step()  # the capture
    static.rewind(0)
    got = []
    for _ in range(steps):
        for layer, (appended, seen) in zip(static.layers, frozen, strict=True):
            layer.appended, layer.seen = appended, seen
        step.input_ids.copy_(token)
        logits, token = step()
        got.append(logits)
    return torch.stack(got)


def _attend_reference(query, kept_keys, kept_values, visible, new_keys, new_values, scaling):
    """Float64 attention, one (row, head, token) at a time, over that row's visible kept slots and the new
    tokens up to the token itself: (batch, q_len, q_heads, dim)."""
    batch, q_heads, q_len, dim = query.shape
    groups = q_heads // kept_keys.shape[1]
    appended = new_keys.shape[2]
    out = torch.empty(batch, q_len, q_heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            g = h // groups
            for t in range(q_len):
                seen = appended - q_len + t + 1
                keys = torch.cat([kept_keys[b, g][visible[b, g]], new_keys[b, g, :seen]])
                values = torch.cat([kept_values[b, g][visible[b, g]], new_values[b, g, :seen]])
                weights = torch.softmax(keys @ query[b, h, t] * scaling, dim=0)
                out[b, t, h] = weights @ values
    return out


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)]
)
# 3 query heads per KV head: 3 and 9 query rows (matmuls), 18 (SDPA)
@pytest.mark.parametrize("q_len", [1, 3, 6])
def test_attend_equals_a_float64_reference_on_ragged_rows(device, dtype, tol, q_len):
    """Row 0 sees every kept slot, row 1 one (a different one per KV head), row 2 none: its first new token
    sees only itself. Two tokens arrive first, then ``q_len`` more; both calls are checked."""
    batch, kv_heads, groups, width, dim, first = 3, 2, 3, 100, 8, 2
    generator = torch.Generator().manual_seed(q_len)

    def draw(*shape, spread=1.0):  # float64 values exactly representable in ``dtype``
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * spread).to(dtype)

    kept_keys = draw(batch, kv_heads, width, dim, spread=2.0)
    kept_values = draw(batch, kv_heads, width, dim)
    visible = torch.zeros(batch, kv_heads, width, dtype=torch.bool)
    visible[0] = True
    visible[1, 0, 7] = visible[1, 1, width - 1] = True
    layer = StaticBufferLayer(
        0, kept_keys.to(device), kept_values.to(device), visible.to(device), width, 10
    )
    assert layer.keys.shape[2] // layer.chunk > 1  # the value sum is split: partial sums are merged
    new_keys, new_values = draw(batch, kv_heads, 0, dim), draw(batch, kv_heads, 0, dim)
    scaling = dim**-0.5
    for tokens in (first, q_len):
        keys = draw(batch, kv_heads, tokens, dim, spread=2.0)
        values = draw(batch, kv_heads, tokens, dim)
        query = draw(batch, kv_heads * groups, tokens, dim)
        new_keys, new_values = torch.cat([new_keys, keys], 2), torch.cat([new_values, values], 2)
        # update announces the layer to pyramidkv's attention: keep that out of the other tests' context
        contextvars.copy_context().run(layer.update, keys.to(device), values.to(device))
        got = layer.attend(query.to(device), scaling)
        assert got.dtype == dtype and got.shape == (batch, tokens, kv_heads * groups, dim)
        want = _attend_reference(
            *(t.double() for t in (query, kept_keys, kept_values)),
            visible,
            new_keys.double(),
            new_values.double(),
            scaling,
        )
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol)
    assert (groups * q_len <= DECODE_ROWS) == (q_len < 6)


def test_a_wide_layer_rounds_its_capacity_to_its_chunk():
    """2030 slots for 24 (batch, KV head) matrices: chunks of 32, the capacity rounded up to 2048 (to 16
    it would be 2032, no multiple of 32); random visible slots, one decoded token against the reference."""
    batch, kv_heads, groups, width, dim = 8, 3, 3, 2020, 4
    generator = torch.Generator().manual_seed(1)
    kept_keys, kept_values, keys, values, query = (
        torch.randn(*shape, generator=generator, dtype=torch.float64)
        for shape in [(batch, kv_heads, width, dim)] * 2
        + [(batch, kv_heads, 1, dim)] * 2
        + [(batch, kv_heads * groups, 1, dim)]
    )
    visible = torch.rand(batch, kv_heads, width, generator=generator) < 0.5
    layer = StaticBufferLayer(0, kept_keys, kept_values, visible, width, 10)
    assert (layer.chunk, layer.keys.shape[2]) == (32, 2048)
    contextvars.copy_context().run(layer.update, keys, values)
    want = _attend_reference(query, kept_keys, kept_values, visible, keys, values, dim**-0.5)
    torch.testing.assert_close(layer.attend(query, dim**-0.5), want, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def prefilled():
    model = make_tiny("llama")
    cache = CompressedCache(model, "snapkv", 16)
    with torch.no_grad():
        _prefill(model, cache)
    yield model, cache
    cache.close()


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "4"])
def test_bad_max_new_tokens(prefilled, value):
    model, source = prefilled
    with pytest.raises(ValueError, match="max_new_tokens"):
        StaticCompressedCache(model, source, max_new_tokens=value)


def test_a_step_past_max_new_tokens_is_refused_and_changes_nothing(prefilled):
    model, source = prefilled
    token = torch.full((len(ROWS), 1), 7)
    with torch.no_grad(), StaticCompressedCache(model, source, max_new_tokens=2) as static:
        with pytest.raises(ValueError, match="max_new_tokens"):
            model(torch.full((len(ROWS), 3), 7), **cache_kwargs(model, static))
        _greedy(model, static, model(token, **cache_kwargs(model, static)).logits[:, -1], steps=1)
        with pytest.raises(ValueError, match=r"max_new_tokens: .* built for 2 new tokens"):
            model(token, **cache_kwargs(model, static))
        assert static.appended == 2 and int(static.layers[-1].step) == 2
        for bad in (-1, 3, 1.0):
            with pytest.raises(ValueError, match="appended"):
                static.rewind(bad)
        static.rewind(0)
        with pytest.raises(ValueError, match=r"appended: got 1; expected an integer in \[0, 0\]"):
            static.rewind(1)


def test_sources_that_cannot_be_made_static(prefilled):
    model, _ = prefilled
    # FibQuant and TurboQuant codes are taken: tests/test_static_codes.py
    with CompressedCache(model, "snapkv", 16, codec="kivi:2") as coded:
        with torch.no_grad():
            _prefill(model, coded)
        with pytest.raises(ValueError, match=r"source: .*codec 'kivi:2'"):
            StaticCompressedCache(model, coded, max_new_tokens=4)
    with (
        CompressedCache(model, "snapkv", 16) as fresh,
        pytest.raises(ValueError, match="source: layer 0 holds no prefilled prompt"),
    ):
        StaticCompressedCache(model, fresh, max_new_tokens=4)
    with pytest.raises(ValueError, match="source: layer 0"):
        StaticCompressedCache(model, DynamicCache(config=model.config), max_new_tokens=4)
    with pytest.raises(TypeError, match="source: got Tensor"):
        StaticCompressedCache(model, torch.zeros(3), max_new_tokens=4)
