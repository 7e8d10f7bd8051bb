"""Tokens x bits: the rate each prompt token of one layer is stored at, under the layer's byte budget.

A token can be evicted, kept as codes of a few bits, or kept whole. Two kinds of error reach the attention
output, and they add differently:

* **Eviction is coherent.** Dropping a set of tokens with attention share ``M`` moves the output by ``M``
  times the gap between what they held and what the kept tokens hold: the error grows with ``M``, not with
  the root of the sum of squared shares.
* **Quantization is mostly incoherent.** A token kept at rate ``r`` with share ``p`` and logit error ``delta``
  moves the output by about ``p ((e^delta - 1) (v - o) + v_hat - v)``. The part of random sign from token to
  token adds in quadrature: ``d_r p^2``, ``d_r`` measured per layer (:mod:`pyramidkv.cache.planner`). But
  ``e^delta - 1`` has a mean ``c_r`` that is not zero even for an unbiased code (``E[delta^2] / 2`` to second
  order), so the tokens of one rate gain or lose weight together. A gain shared by every kept token cancels
  in the softmax; tiers that gain unequally move the output coherently, as eviction does: the tiers' shares
  of the kept mass change from ``M_r / M_K`` to ``M_r (1 + c_r) / sum_s M_s (1 + c_s)``. This is negligible at
  small logit errors and decisive at large ones (a tail of 2-bit codes whose logits err by 1.3 nats beside
  tokens kept at 4 bits gains about twice its weight).

So a cut of the ranked tokens into tiers (the costliest rate for the most attended, then cheaper rates, then
eviction) costs ``M^2 + sum_r (M_r (1 + c_r) / Z - M_r / M_K)^2 + sum_r d_r sum_{k in r} p_k^2`` in units of
the output's spread (the coherent moves of different tiers taken as independent directions). Under a byte
budget its minimum keeps many tokens at 2-3 bits rather than few whole ones (the eviction term falls faster
than the quantization term grows) while the most attended tokens still earn a high rate. RDKV (2026)
allocates rates to tokens under a byte budget by reverse water-filling; KVTuner and MiniKV mix eviction and
low bit widths at fixed ratios.

Storage makes one restriction: the KV heads of a layer share their count of tokens at each rate (every row of
a block has one length, so nothing is padded), while each head picks its own tokens. So ranks are planned,
not tokens: the share of rank ``k`` is the mean over heads of each head's ``k``-th largest share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RatePoint:
    """One way to store a token: ``cost`` bytes (per token, all KV heads, key and value), ``distortion``, the
    incoherent squared output error of a token kept at this rate relative to its squared share (0 when
    whole), and ``inflation``, the mean relative growth of its attention weight ``c = E[e^delta] - 1`` (module
    docstring): each one number, or a tensor (n,) giving it per rank (a code errs in proportion to the norm
    of what it codes, and the most attended keys are often the longest). ``key`` names it for the caller (a
    bit width, or ``None`` for the model's dtype)."""

    key: float | None
    cost: float
    distortion: float | Tensor
    inflation: float | Tensor = 0.0


def attention_shares(scores: Tensor, valid: Tensor) -> Tensor:
    """(batch, kv_heads, n) float64 attention shares: each (row, head)'s non-negative ``scores`` normalised to
    sum 1 over its valid tokens; 0 at padding. Tokens scored ``+inf`` (the observation window, always kept)
    take the row's largest share."""
    scores = scores.double()
    finite = torch.isfinite(scores) & valid[:, None]
    shares = torch.where(finite, scores.clamp_min(0), 0.0)
    shares = shares / shares.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    top = shares.amax(dim=-1, keepdim=True)
    return torch.where((scores == float("inf")) & valid[:, None], top, shares)


def rank_order(weights: Tensor, valid: Tensor, forced: Tensor) -> Tensor:
    """(batch, kv_heads, n) token positions by rank: ``forced`` (batch, n) tokens first (most recent first),
    then valid tokens by ``weights`` (batch, kv_heads, n), ties to the more recent, then padding."""
    n = weights.shape[-1]
    tier = (valid.long() + forced.long())[:, None].expand_as(
        weights
    )  # 2 forced, 1 candidate, 0 padding
    flipped = torch.nan_to_num(weights, nan=-1.0).flip(-1)
    order = flipped.argsort(dim=-1, descending=True, stable=True)
    order = order.gather(
        -1, tier.flip(-1).gather(-1, order).argsort(dim=-1, descending=True, stable=True)
    )
    return (n - 1) - order


def assign_rates(
    profile: Tensor,
    forced: int,
    points: list[RatePoint],
    budget: float,
    gap: float = 1.0,
    grid: int = 24,
) -> Tensor:
    """(n,) the index in ``points`` each rank is stored at, -1 where it is evicted (a CPU tensor).

    ``profile`` (n,): the attention share of each rank (the ``forced`` first ranks are always kept); ``budget``:
    bytes for the ranks of this layer. Ranks are cut into consecutive tiers, the costliest rate first; the
    distortion of a cut is ``g (M^2 + sum_r (M_r (1 + c_r) / Z - M_r / M_K)^2) + sum_r d_r sum_{k in r} p_k^2``
    (module docstring): the evicted share ``M`` and the tiers' unequal weight inflation move the output
    coherently, by ``gap`` (``g``) times the output's spread; the rest of the quantization errors add in
    quadrature. The counts of every rate but the
    cheapest are searched over every value when the layer holds fewer than ``grid`` ranks, else on a
    geometric grid of ``grid`` points, and the cheapest also at the most the bytes left allow.
    """
    n = profile.shape[0]
    device = profile.device
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    order = sorted(range(len(points)), key=lambda i: -points[i].cost)
    costs = torch.tensor([points[i].cost for i in order], dtype=torch.float64, device=device)
    p = profile.double()

    def per_rank(field: str) -> Tensor:  # (rates, n) in cost order
        found = [torch.as_tensor(getattr(points[i], field), dtype=torch.float64) for i in order]
        return torch.stack([f.to(device).expand(n) for f in found])

    # a logit error moves a token's weight by p (1 - p) delta, and v - o shrinks by (1 - p) as the token
    # dominates the output, so the most attended tokens (attention sinks) gain less from precision than p^2
    damped = (p * (1 - p)).square()
    first = torch.zeros(len(order), 1, dtype=torch.float64, device=device)
    square = torch.cat([first, (damped * per_rank("distortion")).cumsum(1)], dim=1)
    grown = torch.cat([first, (p * per_rank("inflation")).cumsum(1)], dim=1)
    mass = torch.cat([first[0], p.cumsum(0)])
    if n < grid:
        steps = torch.arange(n + 1)
    else:
        steps = (
            torch.cat([torch.zeros(1), torch.logspace(0, math.log10(n), grid)])
            .round()
            .long()
            .unique()
        )
    if len(order) > 1:  # the counts of every rate but the cheapest, on the grid
        free = torch.cartesian_prod(*[steps.to(device)] * (len(order) - 1))
        free = free.reshape(-1, len(order) - 1)
    else:
        free = torch.zeros(1, 0, dtype=torch.long, device=device)
    spent = free.double() @ costs[:-1]
    room = (n - free.sum(dim=1)).clamp(min=0)
    affordable = torch.minimum(((budget - spent) / costs[-1]).floor().clamp(min=0).long(), room)
    last = torch.cat([steps.to(device).expand(len(free), -1), affordable[:, None]], dim=1)
    last = torch.minimum(
        last, affordable[:, None]
    )  # the cheapest rate: every grid count that fits, and all
    counts = torch.cat([free.repeat_interleave(last.shape[1], dim=0), last.reshape(-1, 1)], dim=1)
    spent = spent.repeat_interleave(last.shape[1])
    cuts = counts.cumsum(dim=1)
    fits = (spent <= budget + 1e-9) & (cuts[:, -1] <= n) & (cuts[:, -1] >= min(forced, n))
    cuts = cuts.clamp(max=n)  # cuts past the prompt do not fit; clamped only to be indexable
    if not bool(fits.any()):  # not even the window at the cheapest rate: keep what fits of it
        counts = torch.zeros(1, len(order), dtype=torch.long, device=device)
        counts[0, -1] = min(n, int(budget // costs[-1]))
        cuts, fits = counts.cumsum(dim=1), torch.ones(1, dtype=torch.bool, device=device)
    starts = torch.cat([torch.zeros_like(cuts[:, :1]), cuts[:, :-1]], dim=1)
    quantized = (square.gather(1, cuts.T) - square.gather(1, starts.T)).sum(dim=0)
    tiers = (mass[cuts] - mass[starts]).T  # (rates, cuts)
    inflated = tiers + grown.gather(1, cuts.T) - grown.gather(1, starts.T)
    kept = tiers.sum(dim=0).clamp_min(1e-300)
    moved = (inflated / inflated.sum(dim=0).clamp_min(1e-300) - tiers / kept).square().sum(dim=0)
    evicted = mass[-1] - mass[cuts[:, -1]]
    loss = torch.where(fits, gap * (evicted.square() + moved) + quantized, float("inf"))
    best = cuts[loss.argmin()].tolist()
    rates = torch.full(
        (n,), -1, dtype=torch.long
    )  # on the host, where the caller splits it into tiers
    low = 0
    for index, high in zip(order, best, strict=True):
        rates[low:high] = index
        low = high
    return rates
