"""Layer schedules: how an average token budget is spread over a model's layers (pure arithmetic).

* :class:`UniformSchedule` — every layer keeps the same number (SnapKV, H2O, StreamingLLM, ...).
* :class:`PyramidSchedule` — lower layers keep more, upper layers fewer, on a straight line whose slope is
  set by ``beta`` (PyramidKV, Cai et al. 2024, arXiv 2406.02069).

Both keep the total over layers at exactly ``n_layers * budget`` whenever the prompt is longer than the
budget, so methods compared at the same budget hold the same number of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar, Protocol

from pyramidkv.checks import check_int, check_number


class Schedule(Protocol):
    """Spreads an average per-layer budget over the layers of a model. An ``adaptive`` schedule
    (:class:`~pyramidkv.policies.adaptive.AdaptiveSchedule`) sets each layer's budget during the prefill from
    what that layer's attention shows; the others fix every layer's budget from the prompt's length."""

    adaptive: ClassVar[bool]

    def layer_budgets(self, budget: int, n_layers: int, prompt_len: int, window: int) -> list[int]:
        """Tokens each layer keeps (window included), bottom layer first."""
        ...


def _check_schedule_args(budget: int, n_layers: int, prompt_len: int, window: int) -> None:
    for name, value, low in (
        ("budget", budget, 1),
        ("n_layers", n_layers, 1),
        ("prompt_len", prompt_len, 1),
        ("window", window, 0),
    ):
        check_int(name, value, low)


@dataclass(frozen=True)
class UniformSchedule:
    """Every layer keeps the same ``budget`` tokens (clamped to the prompt): SnapKV, H2O, StreamingLLM."""

    adaptive: ClassVar[bool] = False

    def layer_budgets(self, budget: int, n_layers: int, prompt_len: int, window: int) -> list[int]:
        _check_schedule_args(budget, n_layers, prompt_len, window)
        return [min(int(budget), int(prompt_len))] * int(n_layers)


@dataclass(frozen=True)
class PyramidSchedule:
    """PyramidKV's per-layer budgets: a straight line from many tokens at the bottom to few at the top.

    With average budget ``B`` (window ``w`` included), ``L`` layers and a prompt of ``n`` tokens, the
    prefix budget ``s = B - w`` is spread as (Cai et al. 2024; ``beta = 20`` is the authors'
    default in KVCache-Factory ``pyramidkv/pyramidkv_utils.py`` and in kvpress ``PyramidKVPress``)::

        k_min = s / beta,   k_max = 2 s - k_min,   k_l = k_max - l (k_max - k_min) / (L - 1)

    and layer ``l`` (0 = bottom) keeps ``k_l + w`` tokens. The mean of ``k_l`` is ``s``, so the total is
    ``L * B``. When ``k_max + w`` would exceed the prompt, ``k_max`` is clamped to ``n - w`` and ``k_min``
    re-derived as ``2 s - k_max`` so the total is still ``L * B``.

    Unlike the reference code (integer division, total off by up to ``L - 1`` tokens) the real-valued
    targets are computed exactly (rationals) and apportioned by largest remainder, under the constraint
    that budgets stay non-increasing with depth and inside ``[max(w, 1), n]``: every layer gets the
    floor or the ceiling of its target and the total is exactly ``L * B``.

    Regimes where the line does not apply:

    * ``n <= B``: nothing to compress, every layer keeps all ``n`` tokens (total ``L * n``).
    * ``L == 1``: the single layer keeps ``B``.
    * ``B <= w``: no prefix budget to spread, every layer keeps ``B`` (the most recent tokens).

    ``beta`` must be >= 1: below 1, ``k_min > k_max`` and upper layers would get *more* than the bottom
    (kvpress asserts the same).
    """

    adaptive: ClassVar[bool] = False

    beta: float = 20.0

    def __post_init__(self) -> None:
        # 20 in the PyramidKV paper; larger is steeper, 1 is uniform
        check_number("beta", self.beta, 1)

    def layer_budgets(self, budget: int, n_layers: int, prompt_len: int, window: int) -> list[int]:
        _check_schedule_args(budget, n_layers, prompt_len, window)
        n, L, B, w = int(prompt_len), int(n_layers), int(budget), int(window)
        if n <= B:
            return [n] * L
        if L == 1 or w >= B:
            return [B] * L
        targets = self.targets(B, L, n, w)
        return _apportion(targets, L * B, low=max(w, 1), high=n)

    def targets(self, budget: int, n_layers: int, prompt_len: int, window: int) -> list[Fraction]:
        """The exact real-valued per-layer budgets ``k_l + w`` before rounding (needs ``L >= 2``, ``w < B < n``)."""
        n, L, B, w = int(prompt_len), int(n_layers), int(budget), int(window)
        s = Fraction(B - w)
        k_min = s / Fraction(self.beta)
        k_max = 2 * s - k_min
        if k_max > n - w:
            k_max = Fraction(n - w)
            k_min = 2 * s - k_max
        step = (k_max - k_min) / (L - 1)
        return [w + k_max - layer * step for layer in range(L)]


def _apportion(targets: list[Fraction], total: int, low: int, high: int) -> list[int]:
    """Integers near ``targets`` (non-increasing) that sum to ``total``, non-increasing, each in [low, high].

    Start from the floors and hand the missing units, one at a time, to the layer with the largest
    remainder among those that can grow without breaking the order (the first layer of a run of equal
    values) — the largest-remainder method under a monotonicity constraint. A surplus (only when ``low``
    lifted a floor) is taken back symmetrically.
    """
    kept = [min(max(math.floor(t), low), high) for t in targets]
    last = len(kept) - 1
    while sum(kept) < total:
        growable = [
            i for i in range(last + 1) if kept[i] < high and (i == 0 or kept[i - 1] > kept[i])
        ]
        grow = max(growable, key=lambda i: (targets[i] - kept[i], -i))
        kept[grow] += 1
    while sum(kept) > total:
        shrinkable = [
            i for i in range(last + 1) if kept[i] > low and (i == last or kept[i + 1] < kept[i])
        ]
        shrink = max(shrinkable, key=lambda i: (kept[i] - targets[i], i))
        kept[shrink] -= 1
    return kept
