"""Centred keys: a coded layer stores every key minus one shift per (row, KV head) (pyramidkv.cache.layers).

References: attention over the stored codes must equal plain softmax attention over what the layer holds
with the shift added back (so codes, whole tokens and the recent window carry the same shift), and on keys
that share a large direction, as real models' keys do, centring must cut the error codes put into the
model's output (KL from the full cache) against the same codec without it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from pyramidkv import CompressedCache
from pyramidkv.cache.centring import attended_mean
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.errors import PyramidKVError

from .conftest import make_tiny


def _ids(model, n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, n), generator=generator)


def shared_direction_model(offset: float = 12.0):
    """A tiny llama whose keys share one large direction: a key bias on the lowest RoPE frequencies of every
    head (they barely turn over a short prompt), as the massive shared key components of trained models."""
    model = make_tiny("llama", attention_bias=True)
    dim = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.self_attn.k_proj.bias.view(-1, dim)
            bias.zero_()
            bias[:, dim // 2 - 1] = offset
            bias[:, dim - 1] = -offset
    return model


@pytest.mark.parametrize("plan", [False, True])
def test_attention_over_centred_codes_is_attention_over_the_held_keys(plan):
    model = shared_direction_model()
    options = dict(kv_memory="30%", plan="auto:2+3+whole") if plan else dict(budget=40)
    cache = CompressedCache(
        model, "snapkv", codec="fibquant:2", residual=4, kernel="torch", **options
    )
    ids = _ids(model, 80, batch=2)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
        for step in range(10):  # two flushes of the window into codes, two tokens waiting
            model(ids[:, step : step + 1], **cache_kwargs(model, cache))
    generator = torch.Generator().manual_seed(3)
    for layer in cache.layers:
        assert layer.key_shift is not None and layer.key_shift.abs().max() > 1.0
        held_keys, held_values, held = layer.held()  # the shift added back
        keys = torch.cat([held_keys, layer._uncentred(layer.keys)], dim=-2)
        values = torch.cat([held_values, layer.values], dim=-2)
        visible = torch.cat([held, held.new_ones(2, layer.keys.shape[-2])], dim=1)
        query = torch.randn(2, 4, 1, keys.shape[-1], generator=generator)
        group = query.shape[1] // keys.shape[1]
        logits = query @ keys.repeat_interleave(group, dim=1).transpose(-1, -2) * 0.25
        logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
        want = logits.softmax(-1) @ values.repeat_interleave(group, dim=1)
        got = layer.attend(query, 0.25).transpose(1, 2)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    cache.close()


@pytest.mark.parametrize("codec", ["fibquant:2", "turboquant:3"])
def test_centring_cuts_the_error_of_keys_sharing_a_direction(codec):
    """Layer 0 (its keys depend on the tokens alone): attention over its codes against exact attention over
    the full cache's keys and values, for queries of the model's scale, with and without centring."""
    model = shared_direction_model()
    ids = _ids(
        model, 97, seed=1
    )  # a prompt of 96, then one decode step: its key waits in the window
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, full))
    keys, values = full.layers[0].keys, full.layers[0].values
    queries = torch.randn(8, 1, 4, 1, keys.shape[-1], generator=torch.Generator().manual_seed(2))
    exact = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=0.25, enable_gqa=True)
        for q in queries
    ])  # fmt: skip
    error = {}
    for center in (False, True):
        cache = CompressedCache(model, "full", codec=codec, residual=8, center_keys=center)
        with torch.no_grad():
            model(ids[:, :96], **cache_kwargs(model, cache))
            model(ids[:, 96:], **cache_kwargs(model, cache))
            got = torch.cat([cache.layers[0].attend(q, 0.25).transpose(1, 2) for q in queries])
        error[center] = float((got - exact).norm() / exact.norm())
        cache.close()
    assert error[True] < 0.5 * error[False], error


def test_key_shifts_are_held_and_counted():
    model = make_tiny("llama")
    ids = _ids(model, 60)
    limit = 9000
    cache = CompressedCache(model, "pyramidkv", kv_memory=limit, codec="fibquant:2")
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    shifts = sum(layer.key_shift.numel() * 4 for layer in cache.layers)
    assert shifts == 4 * 2 * model.config.head_dim * 4  # layers x KV heads x dim x float32
    assert cache.memory_report()["components"]["shift"] == shifts
    assert cache.nbytes() <= limit
    plain = CompressedCache(
        model, "pyramidkv", kv_memory=limit, codec="fibquant:2", center_keys=False
    )
    with torch.no_grad():
        model(ids, **cache_kwargs(model, plain))
    # the budget pays for the shifts with tokens: the centred cache keeps fewer, and both fit
    assert plain.nbytes() <= limit
    assert cache.kept_tokens().sum() < plain.kept_tokens().sum()
    cache.close()
    plain.close()


def test_which_caches_centre_their_keys():
    model = make_tiny("llama")

    def centred(**options) -> bool:
        with CompressedCache(model, "snapkv", **options) as cache:
            return cache.center_keys

    assert centred(codec="fibquant") and centred(codec="turboquant")
    assert not centred(codec="kivi")  # its per-channel zero points absorb a mean already
    assert centred(codec="kivi", center_keys=True)
    assert not centred() and not centred(codec="fibquant", center_keys=False)
    with pytest.raises(PyramidKVError, match="center_keys: keys are kept whole"):
        centred(center_keys=True)
    with pytest.raises(PyramidKVError, match="center_keys: got 'yes'"):
        centred(codec="fibquant", center_keys="yes")


def test_the_planner_measures_the_distortion_of_the_codes_it_will_hold():
    """A planned layer codes its keys centred, so the planner's distortion of each rate is that of centred keys:
    on keys sharing a large direction, lower than the raw keys' (which would make it buy too few tokens)."""
    model = shared_direction_model()
    ids = _ids(model, 96, seed=4)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, full))
    keys, values = full.layers[0].keys, full.layers[0].values
    cache = CompressedCache(model, "snapkv", kv_memory="20%", plan="auto")
    planner, valid = cache.planner, torch.ones(1, 96, dtype=torch.bool)
    queries = torch.randn(1, 4, 8, keys.shape[-1], generator=torch.Generator().manual_seed(5))
    shares = torch.full((1, 2, 96), 1 / 96)
    order = torch.arange(96).expand(1, 2, 96)
    shift = keys.mean(dim=-2, keepdim=True)
    tiers = planner.tiers[:-1]
    codecs = [tier.codecs for tier in tiers]
    plain = planner.sample_ranks(queries, keys, values, valid, shares, order, 96)
    shifted = planner.sample_ranks(queries, keys, values, valid, shares, order, 96, key_shift=shift)
    for tier, raw, centred in zip(
        tiers,
        planner.distortions(codecs, plain, 0.25),
        planner.distortions(codecs, shifted, 0.25),
        strict=True,
    ):
        assert centred[0].mean() < 0.7 * raw[0].mean(), (tier.bits, raw, centred)
        assert centred[1].abs().mean() < 0.7 * raw[1].abs().mean(), (tier.bits, raw, centred)
    cache.close()


def test_the_shift_is_the_keys_mean_under_the_window_attention():
    """:func:`attended_mean` against a loop in float64: per row, KV head and window query (causal, padding
    left out), the softmax of the query's logits, averaged over the window and the head's query group, weights
    the keys."""
    generator = torch.Generator().manual_seed(7)
    batch, heads, group, window, n, dim = 2, 2, 3, 4, 11, 8
    keys = torch.randn(batch, heads, n, dim, generator=generator) + 2.0
    queries = torch.randn(batch, heads * group, window, dim, generator=generator)
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1, :3] = False
    got = attended_mean(keys, queries, valid, 0.5)
    for b in range(batch):
        for h in range(heads):
            weights = torch.zeros(n, dtype=torch.float64)
            for g in range(group):
                for w in range(window):
                    q = queries[b, h * group + g, w].double()
                    seen = [i for i in range(n) if valid[b, i] and i <= n - window + w]
                    logits = torch.stack([q @ keys[b, h, i].double() * 0.5 for i in seen])
                    weights[seen] += logits.softmax(0) / (group * window)
            want = weights @ keys[b, h].double()
            torch.testing.assert_close(got[b, h, 0].double(), want, atol=1e-5, rtol=1e-5)
