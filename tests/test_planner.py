"""The memory planner: its tier search against brute force, the bytes it holds against the budget, and the
attention of a planned layer against a float64 softmax over its decoded tiers."""

from __future__ import annotations

import itertools

import pytest
import torch

from pyramidkv import CompressedCache
from pyramidkv.cache.accounting import full_cache_nbytes
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.planned import PlannedLayer
from pyramidkv.cache.planner import Plan, parse_plan
from pyramidkv.errors import PyramidKVError
from pyramidkv.policies.rates import RatePoint, assign_rates, attention_shares, rank_order
from tests.conftest import make_tiny


def _loss(profile, rates, points, gap):
    """The distortion of one assignment, written out token by token: the evicted mass, and the kept tiers'
    shares of the kept attention moved by each token's weight inflation, coherent; the rest in quadrature
    with the damped share ``p (1 - p)``. A point's distortion and inflation are per rank."""

    def at(value, rank):
        return float(value[rank]) if isinstance(value, torch.Tensor) else value

    evicted = sum(p for p, r in zip(profile, rates, strict=False) if r < 0)
    kept = 1 - evicted
    tiers = [
        sum(p for p, r in zip(profile, rates, strict=False) if r == i) for i in range(len(points))
    ]
    grown = [
        sum(
            p * (1 + at(points[i].inflation, k))
            for k, (p, r) in enumerate(zip(profile, rates, strict=False))
            if r == i
        )
        for i in range(len(points))
    ]
    moved = (
        sum((g / sum(grown) - m / kept) ** 2 for g, m in zip(grown, tiers, strict=True))
        if kept > 0
        else 0
    )
    quantized = sum(
        at(points[r].distortion, k) * (p * (1 - p)) ** 2
        for k, (p, r) in enumerate(zip(profile, rates, strict=False))
        if r >= 0
    )
    return gap * (evicted**2 + moved) + quantized


@pytest.mark.parametrize("seed", range(10))
def test_assign_rates_finds_the_brute_force_optimum(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 7
    profile = torch.rand(n, generator=gen, dtype=torch.float64).sort(descending=True).values
    profile /= profile.sum()
    points = [
        RatePoint(None, 8.0, 0.0),
        RatePoint(4.0, 3.0, 0.2, 0.05),
        RatePoint(
            2.0,
            1.0,
            1.3 * torch.rand(n, generator=gen, dtype=torch.float64),
            torch.rand(n, generator=gen, dtype=torch.float64),
        ),
    ]
    budget = float(torch.randint(3, 30, (1,), generator=gen))
    gap = float(torch.rand(1, generator=gen)) + 0.2
    found = assign_rates(profile, 1, points, budget, gap).tolist()
    assert sum(points[r].cost for r in found if r >= 0) <= budget
    best = min(
        _loss(profile.tolist(), combo, points, gap)
        for combo in itertools.product(range(-1, 3), repeat=n)
        if sum(points[r].cost for r in combo if r >= 0) <= budget
        and combo[0] >= 0
        and all(
            a == -1 or b == -1 or points[a].cost >= points[b].cost
            for a, b in itertools.pairwise(combo)
        )
        and all(not (a == -1 and b != -1) for a, b in itertools.pairwise(combo))
    )
    assert _loss(profile.tolist(), found, points, gap) == pytest.approx(best, rel=1e-9, abs=1e-15)


def test_attention_shares_and_rank_order_keep_the_window_first():
    scores = torch.tensor([[[1.0, 3.0, 0.0, 2.0, float("inf")]]])
    valid = torch.tensor([[False, True, True, True, True]])
    shares = attention_shares(scores, valid)
    assert shares[0, 0].tolist() == pytest.approx([0.0, 0.6, 0.0, 0.4, 0.6])
    forced = torch.tensor([[False, False, False, False, True]])
    assert rank_order(shares, valid, forced)[0, 0].tolist() == [4, 1, 3, 2, 0]


def _planned(model, ids, mask=None, **options):
    cache = CompressedCache(model, policy="snapkv", **{"plan": "auto", **options})
    with torch.inference_mode():
        model(ids, attention_mask=mask, **cache_kwargs(model, cache))
    return cache


@pytest.mark.parametrize("memory", ["12%", "30%", 60_000])
def test_planned_cache_holds_at_most_its_bytes(memory):
    model = make_tiny("llama")
    ids = torch.randint(
        0, model.config.vocab_size, (1, 600), generator=torch.Generator().manual_seed(0)
    )
    cache = _planned(model, ids, kv_memory=memory)
    report = cache.memory_report()
    full = full_cache_nbytes(model.config, 600, 1, torch.float32)
    allowed = memory if isinstance(memory, int) else float(memory[:-1]) / 100 * full
    assert report["prompt_bytes"] <= allowed
    everything = all(  # every token at the highest rate offered: nothing left to spend on
        [(r["bits"], r["tokens"]) for r in rates] == [(4.0, [[600] * 2])]
        for rates in report["rates"]
    )
    assert (
        everything or report["prompt_bytes"] >= 0.9 * allowed
    )  # the budget is spent, not left idle
    assert report["prompt_bytes"] == cache.nbytes()
    for layer, rates in zip(cache.layers, report["rates"], strict=True):
        assert isinstance(layer, PlannedLayer)
        assert sum(r["bytes"] for r in rates) == layer.components()["codes"] + layer.components()[
            "side"] + layer.components()["kept_fp"]  # fmt: skip
        held = sum(torch.tensor(r["tokens"]) for r in rates)
        assert torch.equal(held, layer.kept_tokens())
    cache.close()


def test_planned_layer_attends_as_a_softmax_over_its_decoded_tiers():
    model = make_tiny("llama")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 400), generator=gen)
    cache = _planned(model, ids, kv_memory="16%", plan="auto:2+3+4+whole")
    with torch.inference_mode():
        model(ids[:, :3], **cache_kwargs(model, cache))  # a recent window of appended tokens
    mixed = [x for x in cache.layers if x.kept_keys is not None and len(x.rates()) >= 3]
    assert mixed  # a layer holding whole tokens and codes of two rates
    layer = mixed[0]
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    query = torch.randn(1, heads, 2, layer.keys.shape[-1], generator=gen)
    out = layer.attend(query, 0.25)
    parts = []  # (keys, values, visible per KV head) of every tier, decoded, then the whole tokens
    for block in layer.coded.blocks:
        keys = block.codecs.keys.decode(block.keys, torch.float64)
        values = block.codecs.values.decode(block.values, torch.float64)
        parts.append(
            (keys, values, torch.arange(block.tokens)[None, None] < block.lengths[..., None])
        )
    slots = layer.kept_keys.shape[-2]
    parts.append((layer.kept_keys.double(), layer.kept_values.double(),
                  torch.arange(slots)[None, None] < layer.whole_lengths[..., None]))  # fmt: skip
    for h in range(heads):
        kv = h // (heads // kv_heads)
        keys = torch.cat([k[0, kv][v[0, kv]] for k, _, v in parts] + [layer.keys[0, kv].double()])
        values = torch.cat(
            [x[0, kv][v[0, kv]] for _, x, v in parts] + [layer.values[0, kv].double()]
        )
        recent = layer.keys.shape[-2]
        for i in range(2):  # query i sees the appended tokens up to recent - 2 + i
            seen = keys.shape[0] - recent + (recent - 2 + i) + 1
            weights = torch.softmax(query[0, h, i].double() @ keys[:seen].T * 0.25, dim=-1)
            expected = weights @ values[:seen]
            assert torch.allclose(out[0, i, h].double(), expected, atol=1e-4)
    cache.close()


def test_planned_batch_rows_keep_only_their_own_tokens():
    model = make_tiny("llama")
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, model.config.vocab_size, (2, 300), generator=gen)
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, :100] = 0  # row 1 left-padded
    cache = _planned(model, ids, mask, kv_memory="20%")
    full = full_cache_nbytes(model.config, 500, 1, torch.float32)  # 300 + 200 real tokens
    assert cache.memory_report()["prompt_bytes"] <= 0.2 * full
    for layer in cache.layers:
        held = layer.kept_tokens()
        assert int(held[1].max()) <= 200 and int(held[0].max()) <= 300
    with torch.inference_mode():
        step = model(ids[:, -1:], **cache_kwargs(model, cache)).logits
    assert torch.isfinite(step).all()
    cache.close()


def test_a_budget_above_the_prompt_keeps_it_whole():
    model = make_tiny("llama")
    ids = torch.randint(
        0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(3)
    )
    full = full_cache_nbytes(model.config, 200, 1, torch.float32)
    cache = _planned(model, ids, kv_memory=2 * full)
    for layer in cache.memory_report()["rates"]:
        assert [(r["bits"], r["tokens"]) for r in layer] == [(None, [[200, 200]])]
    cache.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"plan": "auto"},
            "plan: 'auto' chooses tokens and bits under a byte budget; give kv_memory",
        ),
        (
            {"plan": "auto", "kv_memory": "5%", "codec": "kivi"},
            "plan: 'auto' plans rates of fibquant",
        ),
        ({"plan": "bogus", "kv_memory": "5%"}, "plan: got 'bogus'; expected 'none', 'auto'"),
    ],
)
def test_bad_plans_are_refused(options, message):
    model = make_tiny("llama")
    with pytest.raises(PyramidKVError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CompressedCache(model, policy="snapkv", **options)


def test_parse_plan():
    assert parse_plan("auto") == Plan() and parse_plan("none") is None and parse_plan(None) is None
    assert parse_plan("auto:4,3") == Plan(bits=(3.0, 4.0), whole=False)
    assert parse_plan(" Auto:2+ 4 ,whole") == Plan(bits=(2.0, 4.0), whole=True)
    assert parse_plan("auto:2,16") == Plan(bits=(2.0,), whole=True)
    for bad in ("auto:", "auto:whole", "auto:two", "none:3", "max"):
        with pytest.raises(PyramidKVError, match="plan: got"):
            parse_plan(bad)
    with pytest.raises(PyramidKVError, match=r"plan: bits must be rates in \(0, 8\]"):
        parse_plan("auto:2,9")
    with pytest.raises(PyramidKVError, match=r"plan: bits must be rates in \(0, 8\], got \(0.0,\)"):
        Plan(bits=(0.0,))


def test_a_budget_below_the_windows_is_refused_before_anything_is_kept():
    model = make_tiny("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 100))
    cache = CompressedCache(model, policy="snapkv", plan="auto", kv_memory=5_000)
    with (
        pytest.raises(
            PyramidKVError, match="kv_memory: 5,000 bytes is less than the smallest planned"
        ),
        torch.inference_mode(),
    ):
        model(ids, **cache_kwargs(model, cache))
    cache.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels run on CUDA")
def test_fused_kernels_read_a_planned_layer_as_torch_does():
    model = make_tiny("llama", head_dim=64).cuda().to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 700), device="cuda")
    cache = _planned(model, ids, kv_memory="15%")
    with torch.inference_mode():
        model(ids[:, :3], **cache_kwargs(model, cache))
    heads = model.config.num_attention_heads
    query = torch.randn(1, heads, 1, 64, device="cuda", dtype=torch.bfloat16)
    assert all(layer.fused_ok for layer in cache.layers)
    for layer in cache.layers:
        fused = layer.attend(query, 0.125)
        layer.fused_ok = False  # the torch path: every tier decoded, one softmax
        reference = layer.attend(query, 0.125)
        layer.fused_ok = True
        assert torch.allclose(fused.float(), reference.float(), atol=2e-2, rtol=2e-2)
    cache.close()


def test_the_plan_command_shows_tokens_per_rate(tmp_path):
    from pyramidkv.eval.plan import measure_plan, plan_table, plot_plan

    model = make_tiny("llama")
    ids = torch.randint(
        0, model.config.vocab_size, (1, 400), generator=torch.Generator().manual_seed(1)
    )
    with CompressedCache(model, policy="snapkv", kv_memory="15%", plan="auto") as cache:
        found = measure_plan(model, ids, cache)
        rates = cache.memory_report()["rates"]
    for layer, shown in zip(rates, found["rates"], strict=True):
        assert {r["bytes"] for r in layer} == {v["bytes"] for v in shown.values()}
        assert sum(v["tokens"][0] for v in shown.values()) == found["kept"][rates.index(layer)][0]
    table = plan_table(found)
    assert table.columns[-1].header == "tokens per rate"
    assert plot_plan(found, tmp_path / "plan.png").stat().st_size > 0


def test_the_static_cache_refuses_a_planned_layer_that_keeps_tokens_whole():
    """Codes of every rate are static (tests/test_static_codes.py); whole tokens beside them are not held."""
    from pyramidkv import StaticCompressedCache

    model = make_tiny("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 300))
    cache = _planned(model, ids, kv_memory="60%", plan="auto:2+3+4+whole")
    assert any(layer.kept_keys is not None for layer in cache.layers)
    with pytest.raises(PyramidKVError, match="keeps tokens whole beside its codes"):
        StaticCompressedCache(model, cache, 4)
    cache.close()


def test_every_rate_rotates_with_one_matrix_counted_once():
    """The rates of a plan share the family's Haar rotation (same head dim and seed): one tensor on a device,
    and one d x d float32 matrix in the cache's bytes beside each rate's own codebook."""
    model = make_tiny("llama")
    cache = CompressedCache(model, "snapkv", kv_memory="20%", plan="auto")
    codecs = [t.codecs.keys for t in cache.tiers if t.codecs is not None]
    assert len(codecs) == 3
    rotations = {id(c.tensors("cpu")[0]) for c in codecs}
    assert len(rotations) == 1
    dim = model.config.head_dim
    books = sum(c.codebook.numel() for c in codecs)
    assert cache.codebook_nbytes() == 4 * (dim * dim + books)
    cache.close()


def test_the_weight_inflation_is_the_coded_tokens_growth_of_attention():
    """Keys along one long shared direction (flat attention, large logit errors once coded): the planner's
    inflation of each rate, averaged over ranks, equals the growth of the coded tokens' attention mass against
    whole tokens beside them (the unnormalised softmax mass), computed in float64 from the decoded keys."""
    model = make_tiny("llama")
    cache = CompressedCache(model, "snapkv", kv_memory="20%", plan="auto", center_keys=False)
    gen = torch.Generator().manual_seed(0)
    kv_heads, dim = model.config.num_key_value_heads, model.config.head_dim
    n, scaling = 96, dim**-0.5
    direction = torch.nn.functional.normalize(torch.randn(dim, generator=gen), dim=0)
    keys = 8.0 * direction + 0.3 * torch.randn(1, kv_heads, n, dim, generator=gen)
    values = torch.randn(1, kv_heads, n, dim, generator=gen)
    queries = direction + 0.3 * torch.randn(
        1, model.config.num_attention_heads, 8, dim, generator=gen
    )
    valid, shares = torch.ones(1, n, dtype=torch.bool), torch.full((1, kv_heads, n), 1 / n)
    grouped = queries.double().reshape(1, kv_heads, -1, dim)
    logits = torch.einsum("bhqd,bhnd->bhqn", grouped, keys.double()) * scaling
    order = torch.arange(n).expand(1, kv_heads, n)
    sample = cache.planner.sample_ranks(queries, keys, values, valid, shares, order, n)
    rates = cache.planner.tiers[:-1]
    found = cache.planner.distortions([rate.codecs for rate in rates], sample, scaling)
    for rate, (_, inflation) in zip(rates, found, strict=True):
        decoded = rate.codecs.keys.decode(rate.codecs.keys.encode(keys.float()), torch.float64)
        coded = torch.einsum("bhqd,bhnd->bhqn", grouped, decoded) * scaling
        growth = coded.exp().sum(-1) / logits.exp().sum(-1) - 1
        assert inflation.shape == (n,)
        assert float(inflation.mean()) == pytest.approx(float(growth.mean()), rel=0.1, abs=2e-3), (
            rate.bits
        )
    cache.close()


def test_generated_tokens_leave_the_window_at_the_plans_highest_rate():
    """The plan rates the prompt's tokens; the tokens generated after it are coded, once they leave the recent
    window, at the plan's highest rate (the codec's default would be 2 bits), unless a codec is given."""
    model = make_tiny("llama")
    assert CompressedCache(model, "snapkv", kv_memory="20%", plan="auto").codecs.bits == 4
    assert CompressedCache(model, "snapkv", kv_memory="20%", plan="auto:2+3").codecs.bits == 3
    given = CompressedCache(model, "snapkv", kv_memory="20%", plan="auto", codec="fibquant:2")
    assert given.codecs.bits == 2


def test_a_plan_of_one_rate_codes_or_evicts():
    model = make_tiny("llama")
    ids = torch.randint(
        0, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(2)
    )
    cache = _planned(model, ids, kv_memory="8%", plan="auto:3")
    rates = [{r["bits"] for r in layer} for layer in cache.memory_report()["rates"]]
    assert all(r == {3.0} for r in rates)
    kept = sum(int(layer.kept_tokens().sum()) for layer in cache.layers)
    assert 0 < kept < 300 * model.config.num_hidden_layers * model.config.num_key_value_heads
    cache.close()
