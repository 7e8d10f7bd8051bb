"""Adaptive layer budgets: each layer's share of the total from its own observation-window attention.

CAKE (Qin et al., ICLR 2025, arXiv 2503.12491) sizes a layer's cache by a *preference* computed from the
attention of the prompt's last queries: the spatial dispersion ``H`` (entropy of the window's mean attention
over the prefix: attention spread over many tokens needs many) and the temporal shift ``V`` (variance over
the window's queries of the attention each token gets: attention that moves between queries needs more
tokens to cover future queries), ``P = H^(1/tau1) V^(1/tau2)``.

pyramidkv compresses each layer right after its prefill attention, so a layer's budget must be set before
the layers above it have run. The allocation is causal: layer ``l`` takes of the budget that remains the
share its preference would have if every layer still to come had the mean preference of the layers seen so
far, ``b_l = R_l P_l / (P_l + (L - 1 - l) mean(P_0..P_l))``, clamped so that every later layer can still keep
its observation window; the last layer takes what remains. The total over layers is exactly ``L x budget``
(the same tokens, and bytes, as the uniform and pyramid schedules), or the whole prompt where a layer's
share would exceed it. With equal preferences every layer gets the average.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from pyramidkv.checks import check_number
from pyramidkv.policies.base import attention_weights, check_inputs
from pyramidkv.policies.schedules import UniformSchedule


def preference(
    queries: Tensor, keys: Tensor, valid: Tensor, scaling: float, tau1: float, tau2: float
) -> Tensor:
    """(batch,) CAKE's preference ``H^(1/tau1) V^(1/tau2)`` of one layer from its window ``queries``
    (batch, q_heads, w, d) over ``keys`` (batch, kv_heads, n, d), averaged over query heads."""
    batch, kv_heads, groups, window, n = check_inputs(queries, keys, valid)
    first = n - window
    weights = attention_weights(queries, keys, valid, scaling, first)[
        ..., :first
    ]  # the prefix only
    weights = weights.reshape(batch, kv_heads * groups, window, first).double()
    mean = weights.mean(dim=2)
    share = mean / mean.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    entropy = -(share * share.clamp_min(1e-30).log()).sum(dim=-1)  # (batch, heads)
    shift = weights.var(dim=2, unbiased=False).sum(dim=-1)
    return (entropy.pow(1 / tau1) * shift.pow(1 / tau2)).mean(dim=1).float()


@dataclass
class _Progress:
    """What the allocation has seen of one prefill, per row: tokens given and the sum of preferences."""

    spent: list[int]
    preferences: list[float]
    layers: int = 0


@dataclass(frozen=True)
class AdaptiveSchedule:
    """Per-layer budgets chosen during the prefill from each layer's preference (module docstring).

    ``tau1`` / ``tau2``: the temperatures of the entropy and the variance in the preference (CAKE's, 1 and
    1 by default). Before a prompt is seen it has no preferences, so :meth:`layer_budgets` gives the uniform
    split, which is also what it gives when every layer prefers alike.
    """

    tau1: float = 1.0
    tau2: float = 1.0
    adaptive: ClassVar[bool] = True
    _uniform: UniformSchedule = field(default_factory=UniformSchedule, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_number("tau1", self.tau1, 0, low_open=True)
        check_number("tau2", self.tau2, 0, low_open=True)

    def layer_budgets(self, budget: int, n_layers: int, prompt_len: int, window: int) -> list[int]:
        return self._uniform.layer_budgets(budget, n_layers, prompt_len, window)

    def preference(self, queries: Tensor, keys: Tensor, valid: Tensor, scaling: float) -> Tensor:
        """(batch,) this layer's preference (:func:`preference`) at this schedule's temperatures."""
        return preference(queries, keys, valid, scaling, self.tau1, self.tau2)

    def start(self, batch: int) -> _Progress:
        """The state of a new prefill of ``batch`` rows."""
        return _Progress([0] * batch, [0.0] * batch)

    def next_budgets(
        self,
        progress: _Progress,
        preferences: list[float],
        averages: list[int],
        counts: list[int],
        n_layers: int,
        window: int,
    ) -> list[int]:
        """Tokens the next layer keeps per row, from its ``preferences``, the rows' average budgets
        ``averages`` and valid token ``counts``; records them in ``progress``. Host arithmetic on one number per
        row: the preferences are read from the device once per layer, or once for all layers when every layer
        is compressed at the end of the forward."""
        layer = progress.layers
        later = n_layers - 1 - layer
        budgets = []
        for row, (wish, average, count) in enumerate(
            zip(preferences, averages, counts, strict=True)
        ):
            remaining = average * n_layers - progress.spent[row]
            progress.preferences[row] += wish
            mean = progress.preferences[row] / (layer + 1)
            least = min(average, window)
            if later == 0:
                budget = remaining
            else:
                wanted = remaining * wish / max(wish + later * mean, 1e-30)
                # room for the later layers' windows, and this layer's own
                budget = max(min(round(wanted), remaining - later * least), least)
            budget = min(budget, count)
            progress.spent[row] += budget
            budgets.append(budget)
        progress.layers += 1
        return budgets
