"""Which prompt tokens each layer of one cache keeps: the policy, the user's budget and the layer schedule.

One :class:`Selection` serves every layer of a :class:`~pyramidkv.cache.compressed.CompressedCache`; each layer
holds it and calls :meth:`Selection.choose` once, at prefill. It turns the budget (tokens, a fraction of the
prompt, or bytes of KV memory) into one integer per layer through the policy's schedule, scores the prompt
with the policy's scorer on the layer's observation-window queries, and selects per (sequence, KV head) row
(:func:`pyramidkv.policies.select`). Pure tensor code apart from the byte figures the cache hands it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from pyramidkv.budgets import Budget, MemoryBudget
from pyramidkv.cache.host import to_device
from pyramidkv.cache.parallel import TensorParallel
from pyramidkv.policies import Policy, select
from pyramidkv.policies.heads import head_budgets


class Chosen(NamedTuple):
    """What :meth:`Selection.choose` keeps: ``indices`` (batch, kv_heads, K), ``lengths`` (batch, kv_heads), and
    whether rows keep different counts (``ragged``), known on the host."""

    indices: torch.Tensor
    lengths: torch.Tensor
    ragged: bool


@dataclass
class Selection:
    """The policy and budget of one cache, and the per-layer budgets derived from them (module docstring).

    ``token_bytes`` is what one kept token costs in one layer (all KV heads, key and value) as the cache
    stores it; ``full_token_bytes`` the same uncompressed, in the model's dtype; ``fixed_bytes`` what the
    cache holds whatever it keeps (codebooks); ``row_bytes`` the length counter of one (sequence, KV head)
    row and ``shift_bytes`` its key shift (centred keys, :mod:`.layers`); ``sliding`` the number of sliding-window layers kept whole beside the ``num_layers`` compressed
    ones and their window. A ``kv_memory`` budget is turned into tokens from these.
    """

    policy: Policy
    budget: Budget
    kv_memory: MemoryBudget | None
    num_layers: int
    num_kv_heads: int
    token_bytes: float
    full_token_bytes: int
    fixed_bytes: int
    row_bytes: int = 8
    shift_bytes: int = 0
    sliding: tuple[int, int] = (0, 0)  # (sliding-window layers kept whole, their window)
    # the ranks sharing each layer's KV heads (tensor parallelism)
    parallel: TensorParallel | None = None
    # scores of one prompt, shared by caches built from one capture (pyramidkv.eval.prefill): a policy's
    # scores do not depend on the budget, so four budgets of H2O score the prompt once, not four times
    score_memo: dict | None = None
    _schedules: dict[tuple[int, int], list[int]] = field(default_factory=dict, repr=False)
    _progress: object = field(
        default=None, repr=False
    )  # an adaptive schedule's state in this prefill
    # kept tokens per layer as a multiple of the budget's (at most the prompt): a chunked prefill's headroom
    headroom: float = 1.0

    def average_budget(self, prompt_len: int, batch: int = 1) -> int:
        """Average tokens per layer for one row: from ``budget``, or from ``kv_memory`` when it is set, times
        ``headroom`` (at most the prompt)."""
        tokens = self._average_budget(prompt_len, batch)
        if self.headroom == 1:
            return tokens
        return min(prompt_len, math.ceil(tokens * self.headroom))

    def _average_budget(self, prompt_len: int, batch: int) -> int:
        if self.kv_memory is None:
            return self.budget.tokens_for(prompt_len)
        fixed = self.fixed_bytes + self.num_layers * batch * self.num_kv_heads * self.per_row_bytes
        return self.kv_memory.tokens_for(
            prompt_len,
            batch,
            self.num_layers,
            self.token_bytes,
            self.full_token_bytes,
            fixed,
            self.whole_bytes(prompt_len),
        )

    @property
    def per_row_bytes(self) -> int:
        """What one (sequence, KV head) row of one layer holds whatever it keeps: its length and key shift."""
        return self.row_bytes + self.shift_bytes

    def whole_bytes(self, prompt_len: int) -> int:
        """Bytes one row's sliding-window layers hold whole after a prompt of ``prompt_len`` tokens: their last
        window - 1 tokens each, as the full cache holds them (:func:`~pyramidkv.cache.accounting.full_cache_nbytes`)."""
        layers, window = self.sliding
        return layers * min(prompt_len, max(window - 1, 0)) * self.full_token_bytes

    def layer_budgets(self, prompt_len: int, batch: int = 1) -> list[int]:
        """Tokens each layer keeps (window included) for one sequence of ``prompt_len`` real tokens."""
        key = (prompt_len, batch)
        if key not in self._schedules:
            if self.policy.is_full():
                budgets = [prompt_len] * self.num_layers
            else:
                budgets = self.policy.schedule.layer_budgets(
                    self.average_budget(prompt_len, batch),
                    self.num_layers,
                    prompt_len,
                    self.policy.window,
                )
            self._schedules[key] = budgets
        return self._schedules[key]

    def choose(
        self,
        layer_idx: int,
        queries: torch.Tensor,
        keys: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
        seen: list[int] | None = None,
        counts: list[int] | None = None,
    ) -> Chosen:
        """The tokens layer ``layer_idx`` keeps.

        ``valid`` (batch, n) marks the candidates, ``counts`` how many each row has when the caller knows it
        on the host (read from ``valid`` otherwise); ``seen`` the real tokens of each row's prompt so far,
        which the budgets follow (the candidates' counts when None; more in a chunked prefill, where earlier
        chunks were already compressed). With both given and a schedule and heads that are not adaptive,
        nothing here waits for the device."""
        counts = valid.sum(dim=1).tolist() if counts is None else counts
        seen = counts if seen is None else seen
        policy, scorer = self.policy, self.policy.scorer
        if scorer is not None and policy.schedule.adaptive:
            kept = self._adaptive_budgets(layer_idx, queries, keys, valid, scaling, counts, seen)
        else:
            kept = [
                min(self.layer_budgets(s, len(seen))[layer_idx], n) if n else 0
                for n, s in zip(counts, seen, strict=True)
            ]
        budgets = to_device(kept, keys.device)
        ragged = len(set(kept)) > 1
        if scorer is None or all(k >= n for k, n in zip(kept, counts, strict=True)):
            scores = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
            return Chosen(*select(scores, valid, budgets, policy.window, kept), ragged)
        scores = self.scores(layer_idx, queries, keys, valid, scaling)
        if policy.heads == "adaptive":
            budgets = self.head_budgets(scores, valid, budgets)
            indices, lengths = select(scores, valid, budgets, policy.window)
            return Chosen(indices, lengths, bool((lengths != indices.shape[-1]).any()))
        return Chosen(*select(scores, valid, budgets, policy.window, kept), ragged)

    def head_budgets(
        self, scores: torch.Tensor, valid: torch.Tensor, budgets: torch.Tensor
    ) -> torch.Tensor:
        """(batch, kv_heads) tokens per head of budgets shared across a layer's heads
        (:func:`~pyramidkv.policies.heads.head_budgets`); under tensor parallelism allocated over every rank's
        heads, as on one device, and this rank's returned (:mod:`.parallel`)."""
        window, floor = self.policy.window, self.policy.head_floor
        if self.parallel is None:
            return head_budgets(scores, valid, budgets, window, floor)
        everyone = self.parallel.gather_heads(scores.float())
        return self.parallel.local_heads(head_budgets(everyone, valid, budgets, window, floor))

    def scores(self, layer_idx: int, queries, keys, valid, scaling: float) -> torch.Tensor:
        """(batch, kv_heads, n) the policy scorer's importance of each prompt token of layer ``layer_idx``
        (memoised in ``score_memo`` when it is set)."""
        scorer, window = self.policy.scorer, self.policy.window
        window = None if scorer.needs_all_queries else window
        memo_key = (scorer, window, layer_idx)
        scores = self.score_memo.get(memo_key) if self.score_memo is not None else None
        if scores is None:
            window_queries = queries if window is None else queries[..., -window:, :]
            scores = scorer.score(window_queries, keys, valid, scaling)
            if self.score_memo is not None:
                self.score_memo[memo_key] = scores
        return scores

    def _adaptive_budgets(
        self, layer_idx, queries, keys, valid, scaling, counts, seen
    ) -> list[int]:
        """This layer's budget per row from an adaptive schedule: the prefill's allocation so far, and this
        layer's preference from its observation-window queries (:mod:`pyramidkv.policies.adaptive`)."""
        schedule, batch = self.policy.schedule, len(counts)
        if layer_idx == 0 or self._progress is None:
            self._progress = schedule.start(batch)
        window = min(self.policy.window, queries.shape[-2])
        preferences = schedule.preference(queries[..., -window:, :], keys, valid, scaling).tolist()
        return schedule.next_budgets(
            self._progress,
            preferences,
            self.averages(counts, seen),
            counts,
            self.num_layers,
            self.policy.window,
        )

    def averages(self, counts: list[int], seen: list[int]) -> list[int]:
        """Average tokens per layer of each row (0 for a row with no candidates)."""
        return [
            self.average_budget(s, len(counts)) if n else 0
            for n, s in zip(counts, seen, strict=True)
        ]
