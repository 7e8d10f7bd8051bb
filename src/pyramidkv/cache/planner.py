"""The memory planner: how many tokens each layer keeps, and at which rate, under one byte budget.

``CompressedCache(model, kv_memory="5%", plan="auto")`` stores every prompt token of a layer as codes of 4, 3 or
2 bits or not at all (and, with ``plan="auto:2+3+4+whole"``, whole in the model's dtype), so that the cache
holds at most the stated bytes and the attention output moves as little as the budget allows:

1. **Layer shares.** Layer ``l`` takes a share of the bytes still unspent when its prefill ends: the policy's
   schedule (uniform for SnapKV, the pyramid for PyramidKV), or, for an adaptive schedule, the causal CAKE
   share of its observation-window attention (:mod:`pyramidkv.policies.adaptive`). Whatever a layer leaves
   unspent passes to the layers above, and the last layer takes what remains, so the total is exact.
2. **Distortion of each rate, measured.** On up to ``samples`` tokens of the layer, each rate's codecs encode
   and decode the keys and values. Evicting token ``i`` moves the output by ``p_i (v_i - o)`` (``o`` the
   window's attention output), quantizing it by ``p_i ((e^delta_i - 1) (v_i - o) + v_hat_i - v_i)``
   (``delta`` the logit error under the window's queries). The rate's incoherent error relative to
   eviction's is ``Var[delta] + E|v_hat - v|^2 / E|v - o|^2``, and its weight inflation
   ``E[e^delta] - 1 ~ E[delta + delta^2 / 2]`` (:mod:`pyramidkv.policies.rates`), both per rank.
3. **Tokens x rates.** :func:`pyramidkv.policies.rates.assign_rates` cuts the tokens, ranked by the policy's
   scores, into tiers (whole, 4, 3, 2 bits, evicted) at the least modelled distortion that fits the layer's
   bytes; ``weight`` scales the quantization terms against eviction's (1: as measured).

A layer's KV heads (and a batch's rows) share the count of tokens at each rate, each head keeping its own
tokens, so every block is dense and the bytes planned are the bytes held.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from pyramidkv.budgets import MemoryBudget
from pyramidkv.cache.blocks import CodedBlocks
from pyramidkv.cache.selection import Selection
from pyramidkv.checks import check_int
from pyramidkv.codecs.registry import CodecPair
from pyramidkv.errors import PyramidKVError
from pyramidkv.policies.rates import RatePoint, assign_rates, attention_shares, rank_order

PLAN_NAMES = ("none", "auto")


@dataclass(frozen=True)
class Plan:
    """What the planner may choose from: codes of ``bits`` (of the cache's codec family), and the model's dtype
    when ``whole``; ``samples`` tokens per layer measure each rate's distortion; ``weight`` scales it."""

    bits: tuple[float, ...] = (2.0, 3.0, 4.0)
    # measured (benchmarks/README.md, frontier): whole tokens cost more KL than they save at 2-5% of the bytes
    whole: bool = False
    samples: int = 128
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.bits or any(not 0 < float(b) <= 8 for b in self.bits):
            raise PyramidKVError(f"plan: bits must be rates in (0, 8], got {self.bits!r}")
        check_int("samples", self.samples, 1)


_PLAN_ACCEPTED = (
    "'none', 'auto' (codes of 4, 3 and 2 bits), or 'auto:' and the rates to choose from, e.g. "
    "'auto:3,4' or 'auto:2+4+whole' (bits in (0, 8], separated by ',' or '+'; 'whole' or 16 keeps tokens in the "
    "model's dtype)"
)


def parse_plan(value: str | Plan | None) -> Plan | None:
    """``"auto"`` -> the default :class:`Plan`; ``"auto:3,4,whole"`` -> a plan over those rates; ``"none"`` or
    ``None`` -> no planning; a Plan passes."""
    if value is None or isinstance(value, Plan):
        return value
    text = str(value).strip().lower()
    name, colon, rates = text.partition(":")
    if name not in PLAN_NAMES or (colon and (name == "none" or not rates)):
        raise PyramidKVError(f"plan: got {value!r}; expected {_PLAN_ACCEPTED}")
    if name == "none":
        return None
    if not colon:
        return Plan()
    bits, whole = [], False
    for item in (part.strip() for part in re.split(r"[,+]", rates)):
        if item in ("whole", "16"):
            whole = True
            continue
        try:
            bits.append(float(item))
        except ValueError:
            raise PyramidKVError(f"plan: got {value!r}; expected {_PLAN_ACCEPTED}") from None
    if not bits:
        raise PyramidKVError(
            f"plan: got {value!r}; at least one code rate is needed ({_PLAN_ACCEPTED})"
        )
    return Plan(bits=tuple(sorted(set(bits))), whole=whole)


@dataclass(frozen=True)
class Tier:
    """One rate a planned layer can store tokens at: ``bits`` (None: the model's dtype), its ``codecs`` (None
    when whole) and ``cost`` in bytes per token of one row, all KV heads, key and value."""

    bits: float | None
    codecs: CodecPair | None
    cost: float


@dataclass
class Planner:
    """Plans each layer of one cache as its prefill ends (module docstring).

    ``full_token_bytes``: one token of one layer uncompressed in the model's dtype (the reference of a share);
    ``fixed_bytes``: codebooks, held whatever is kept; ``row_bytes``: one (row, KV head) length counter.
    ``tiers``: the code rates, then whole tokens last; ``whole``: whether the search may choose whole tokens
    (a layer whose bytes hold its whole prompt keeps it whole in any case).
    """

    selection: Selection
    memory: MemoryBudget
    tiers: list[Tier]
    full_token_bytes: int
    fixed_bytes: int
    samples: int = 128
    weight: float = 1.0
    row_bytes: int = 8
    whole: bool = False
    _remaining: float = field(default=0.0, repr=False)
    _preferences: list[float] = field(default_factory=list, repr=False)

    def allowance(self, counts: list[int]) -> float:
        """Bytes the whole batch's planned prompt may hold (rows of ``counts`` valid tokens), fixed bytes and
        every tier's row lengths taken off; raises when not even each layer's window fits at the cheapest rate."""
        layers, heads = self.selection.num_layers, self.selection.num_kv_heads
        batch = len(counts)
        # sliding-window layers keep their windows whole, in the full cache and here (Selection.whole_bytes)
        whole = sum(self.selection.whole_bytes(count) for count in counts)
        rows = layers * batch * heads  # each holds a length per tier, and one key shift
        fixed = self.fixed_bytes + rows * (
            len(self.tiers) * self.row_bytes + self.selection.shift_bytes
        )
        fixed += whole
        if self.memory.nbytes is not None:
            asked, allowed = f"{self.memory.nbytes:,} bytes", self.memory.nbytes - fixed
        else:
            full = sum(counts) * layers * self.full_token_bytes + whole
            asked = f"{self.memory.fraction:.4%} of the full cache ({self.memory.fraction * full:,.0f} bytes)"
            allowed = self.memory.fraction * full - fixed
        window = min(self.selection.policy.window, max(counts))
        smallest = layers * batch * window * min(t.cost for t in self.tiers)
        if allowed < smallest:
            raise PyramidKVError(
                f"kv_memory: {asked} is less than the smallest planned cache: {smallest + fixed:,.0f} bytes "
                f"(each layer's {window}-token window at the cheapest rate, and {fixed:,.0f} bytes of "
                "codebooks, row lengths, key shifts and sliding windows kept whole)"
            )
        return allowed

    def layer_bytes(
        self, layer_idx: int, queries, keys, valid, scaling, counts: list[int]
    ) -> float:
        """Bytes layer ``layer_idx`` may spend: its share of what is left (module docstring, step 1)."""
        selection = self.selection
        layers, policy = selection.num_layers, selection.policy
        if layer_idx == 0:
            self._remaining, self._preferences = self.allowance(counts), []
        later = layers - 1 - layer_idx
        if later == 0:
            return self._remaining
        if policy.schedule.adaptive:
            window = min(policy.window, queries.shape[-2])
            found = policy.schedule.preference(queries[..., -window:, :], keys, valid, scaling)
            self._preferences.append(float(found.mean()))
            here = self._preferences[-1]
            mean = sum(self._preferences) / len(self._preferences)
            return self._remaining * here / max(here + later * mean, 1e-30)
        longest = max(counts)
        nominal = max(1, min(longest, longest // 10))
        shares = policy.schedule.layer_budgets(nominal, layers, longest, policy.window)
        return self._remaining * shares[layer_idx] / max(sum(shares[layer_idx:]), 1)

    def plan(
        self,
        layer_idx: int,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
        seen: list[int] | None = None,
        counts: list[int] | None = None,
        fused: bool = False,
        key_shift: torch.Tensor | None = None,
    ) -> list[tuple[Tier, torch.Tensor, torch.Tensor]]:
        """The tiers layer ``layer_idx`` keeps: ``(tier, indices (batch, kv_heads, K), lengths (batch,
        kv_heads))`` per tier holding tokens, indices ascending and valid up to ``lengths``. ``valid`` marks the
        candidates, ``seen`` the real tokens of each row's prompt so far, which the bytes follow (as in
        :meth:`Selection.choose <pyramidkv.cache.selection.Selection.choose>`); ``counts`` the candidates of
        each row when the caller read them on the host; ``fused``: encode the distortion samples with the
        fused encode kernel (one launch per rate instead of the codec's ~100 operations); ``key_shift``: what
        the layer subtracts from the keys it stores (centred keys), so the distortion is that of the codes
        it will hold."""
        counts = valid.sum(dim=1).tolist() if counts is None else counts
        budget = self.layer_bytes(
            layer_idx, queries, keys, valid, scaling, counts if seen is None else seen
        )
        scores = self.selection.scores(layer_idx, queries, keys, valid, scaling)
        shares = attention_shares(scores, valid)
        batch = shares.shape[0]
        window = min(self.selection.policy.window, max(counts))
        order = rank_order(shares, valid, _window_mask(valid, window))
        longest = max(counts)
        whole = len(self.tiers) - 1  # the last tier keeps tokens in the model's dtype
        if budget >= longest * self.tiers[whole].cost * batch:  # the budget covers the prompt
            rates = torch.full((longest,), whole, dtype=torch.long)
        else:
            rates = self._search(
                order, shares, budget, window, counts, queries, keys, values, valid, scaling, fused,
                key_shift,
            )  # fmt: skip
        spent = 0.0
        found = []
        lengths = torch.tensor(counts, device=order.device)
        for index, tier in enumerate(self.tiers):
            ranks = torch.nonzero(rates == index).flatten().to(order.device)  # rates on the host
            if len(ranks):
                spent += len(ranks) * tier.cost * batch
                found.append((tier, *_gather_ranks(order, ranks, lengths)))
        self._remaining -= spent
        return found

    def _search(
        self, order, shares, budget, window, counts, queries, keys, values, valid, scaling, fused,
        key_shift,
    ) -> torch.Tensor:  # fmt: skip
        """(n,) the tier of each rank (-1: evicted) by :func:`assign_rates` over the offered tiers, on the
        host; ``counts``: each row's candidates."""
        longest = max(counts)
        offered = [i for i, t in enumerate(self.tiers) if t.codecs is not None or self.whole]
        batch = shares.shape[0]
        sample = self.sample_ranks(queries, keys, values, valid, shares, order, longest, key_shift)
        tiers = [self.tiers[i] for i in offered]
        coded = self.distortions(
            [t.codecs for t in tiers if t.codecs is not None], sample, scaling, fused
        )
        points = [
            RatePoint(t.bits, t.cost * batch, 0.0)
            if t.codecs is None
            else RatePoint(t.bits, t.cost * batch, *coded.pop(0))
            for t in tiers
        ]
        profile = shares.gather(-1, order).mean(dim=(0, 1))[:longest]
        gap = _gap(values, shares, valid, order, min(counts))
        chosen = assign_rates(profile, window, points, budget, gap)
        index = torch.tensor(offered, dtype=torch.long, device=chosen.device)
        return torch.where(chosen >= 0, index[chosen.clamp_min(0)], chosen)

    def sample_ranks(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        valid: torch.Tensor,
        shares: torch.Tensor,
        order: torch.Tensor,
        longest: int,
        key_shift: torch.Tensor | None = None,
    ) -> RankSample:
        """The tokens every rate's :meth:`distortions` codes: ``samples`` ranks of ``order`` (batch, kv_heads,
        n) spread evenly over the ``longest`` row, each head's own token of that rank, keys less ``key_shift``
        (batch, kv_heads, 1, dim) as the layer stores them; with the window's ``queries`` grouped by KV head
        and the spread of single values about the ``shares``-weighted output."""
        counts = valid.sum(dim=1).to(keys.device)
        ranks = (
            torch.linspace(0, longest - 1, min(self.samples, longest), device=keys.device)
            .round()
            .long()
            .unique()
        )
        picked = order[:, :, ranks]
        index = picked[..., None].expand(-1, -1, -1, keys.shape[-1])
        k, v = keys.gather(2, index).float(), values.gather(2, index).float()
        if key_shift is not None:
            k = k - key_shift.float()
        ok = (ranks[None] < counts[:, None])[:, None].float()  # (batch, 1, s)
        window = min(self.selection.policy.window, queries.shape[-2])
        batch, _, _, dim = queries.shape
        heads = keys.shape[1]
        grouped = queries[..., -window:, :].float().reshape(batch, heads, -1, dim)
        out = torch.einsum("bhn,bhnd->bhd", shares.float(), values.float())
        spread = ((v - out[:, :, None]).square().sum(-1) * ok).sum()
        # (s,) the (row, head) pairs holding each rank
        rows = (ok.sum(dim=0) * heads).clamp_min(1)[0]
        return RankSample(k, v, ok, grouped, ranks, rows, spread, longest)

    def distortions(
        self, codecs: list[CodecPair], sample: RankSample, scaling: float, fused: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(incoherent error, weight inflation) of a token stored by each of ``codecs`` relative to evicting
        it, each (n,) per rank (module docstring, step 2), measured on ``sample`` (:meth:`sample_ranks`) and
        smoothed over neighbouring ranks: a code errs in proportion to the norm of what it codes, and the most
        attended keys (attention sinks) are often the longest, so one figure for every rank would charge the
        tail with the sinks' errors. ``weight`` scales the error and the square of the inflation; ``fused``:
        encode with the fused kernel. Each rate encodes and decodes on its own; the rest is one batch."""
        if not codecs:
            return []
        k, v, ok = sample.keys, sample.values, sample.ok
        k_errors, v_errors = [], []
        for pair in codecs:
            encode = CodedBlocks(pair).encode(k, v, fused, "planner")
            k_errors.append(pair.keys.decode(encode[0], torch.float32) - k)
            v_errors.append(pair.values.decode(encode[1], torch.float32) - v)
        # (rates, batch, kv_heads, queries, s)
        delta = sample.queries @ torch.stack(k_errors).transpose(-1, -2) * scaling
        moments = torch.stack([delta.mean(dim=3), delta.square().mean(dim=3)], dim=1)
        mean, second = _smoothed((moments * ok).sum(dim=(2, 3)) / sample.rows).unbind(1)
        # a token's weight grows by e^delta - 1: to second order (the exponential's tail would let a few
        # extreme samples decide), delta + delta^2 / 2
        inflation = mean + second / 2
        value_error = (torch.stack(v_errors).square().sum(-1) * ok).sum(dim=(1, 2, 3))
        error = value_error / sample.spread.clamp_min(1e-30)
        incoherent = (second - mean.square()).clamp_min(0) + error[:, None]
        found = _along_ranks(
            torch.stack([incoherent * self.weight, inflation * self.weight**0.5], dim=1),
            sample.ranks,
            sample.n,
        )
        return [(rate[0], rate[1]) for rate in found]


@dataclass(frozen=True)
class RankSample:
    """Sampled tokens of one layer (:meth:`Planner.sample_ranks`): ``keys`` and ``values`` (batch, kv_heads,
    s, dim) float32, ``ok`` (batch, 1, s) where a row holds that rank, the window's ``queries`` (batch,
    kv_heads, group x window, dim), the ``ranks`` sampled (s,), the (row, head) pairs holding each (``rows``),
    the values' ``spread`` about the attention output, and ``n`` ranks in all."""

    keys: torch.Tensor
    values: torch.Tensor
    ok: torch.Tensor
    queries: torch.Tensor
    ranks: torch.Tensor
    rows: torch.Tensor
    spread: torch.Tensor
    n: int


def _smoothed(samples: torch.Tensor, reach: int = 4) -> torch.Tensor:
    """The mean of each sample (last dimension) and its ``reach`` neighbours on either side (fewer at the
    ends)."""
    count = samples.shape[-1]
    padded = torch.cat([samples.new_zeros(*samples.shape[:-1], 1), samples.cumsum(-1)], dim=-1)
    index = torch.arange(count, device=samples.device)
    low, high = (index - reach).clamp(min=0), (index + reach + 1).clamp(max=count)
    return (padded[..., high] - padded[..., low]) / (high - low)


def _along_ranks(samples: torch.Tensor, ranks: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) float64: ``samples`` (..., s) measured at ascending ``ranks``, linearly interpolated between
    them."""
    samples = samples.double()
    if len(ranks) == 1:
        return samples.expand(*samples.shape[:-1], n).clone()
    x = torch.arange(n, device=ranks.device, dtype=torch.float64)
    at = ranks.double()
    right = torch.searchsorted(at, x).clamp(1, len(at) - 1)
    left = right - 1
    blend = ((x - at[left]) / (at[right] - at[left])).clamp(0, 1)
    return torch.lerp(samples[..., left], samples[..., right], blend)


def _gap(
    values: torch.Tensor,
    shares: torch.Tensor,
    valid: torch.Tensor,
    order: torch.Tensor,
    fewest: int,
) -> float:
    """How far evicting the less attended half moves the output, relative to the spread of single values:
    ``|o_tail - o|^2 / E_p |v - o|^2``, ``o`` the share-weighted output and ``o_tail`` the share-weighted mean
    of the values ranked in the lower half (evicted tokens are averaged, so they move it less than one)."""
    values = values.float()
    weights = shares.float()
    out = torch.einsum("bhn,bhnd->bhd", weights, values)
    spread = (weights * (values - out[:, :, None]).square().sum(-1)).sum(-1)
    half = fewest // 2  # the shortest row's candidates, read on the host
    tail = torch.zeros_like(weights).scatter(-1, order[..., half:], 1.0) * weights * valid[:, None]
    tail_out = torch.einsum("bhn,bhnd->bhd", tail, values) / tail.sum(-1, keepdim=True).clamp_min(
        1e-30
    )
    return float((tail_out - out).square().sum(-1).mean() / spread.mean().clamp_min(1e-30))


def _window_mask(valid: torch.Tensor, window: int) -> torch.Tensor:
    """(batch, n) the last ``window`` valid tokens of each row."""
    from_end = valid.sum(dim=1, keepdim=True) - valid.long().cumsum(dim=1)
    return valid & (from_end < window)


def _gather_ranks(
    order: torch.Tensor, ranks: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of ``ranks`` in each row's rank ``order``, ascending, padding (ranks past a row's valid count)
    last; and how many of them each (row, head) holds."""
    n = order.shape[-1]
    positions = order[:, :, ranks]  # (batch, heads, c)
    real = (ranks[None, :] < counts[:, None])[:, None].expand_as(positions)
    key = torch.where(real, positions, positions + n)
    indices = positions.gather(-1, key.argsort(dim=-1))
    return indices, real.sum(dim=-1)
