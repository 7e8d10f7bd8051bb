"""Attention sinks plus recent tokens: the cache of StreamingLLM (Xiao et al. 2023, arXiv 2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from pyramidkv.checks import check_int
from pyramidkv.policies.base import check_inputs


@dataclass(frozen=True)
class SinksRecentScorer:
    """The first ``sinks`` valid tokens first, then the most recent ones; no attention needed.

    StreamingLLM found that the first few tokens soak up attention ("attention sinks") whatever they say,
    so dropping them breaks the model; it keeps those plus a window of recent tokens. ``sinks = 4`` is the
    paper's choice and the one KVCache-Factory uses (its StreamingLLM window is the budget minus 4).

    Score of token j: its position j, except for the sinks, which score ``2n - j``: sinks outrank every
    other token (the earliest sink first, if the budget is tight), and among the rest the more recent
    wins. Exact in float32 for prompts up to 2^23 tokens.
    """

    sinks: int = 4
    needs_all_queries: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_int("sinks", self.sinks, 0)

    def score(self, queries: Tensor, keys: Tensor, valid: Tensor, scaling: float) -> Tensor:
        batch, kv_heads, _, _, n = check_inputs(queries, keys, valid)
        valid = valid.to(keys.device)
        position = torch.arange(n, device=keys.device, dtype=torch.float32).expand(batch, n)
        is_sink = valid & (valid.long().cumsum(dim=1) <= self.sinks)
        scores = torch.where(is_sink, 2 * n - position, position)
        return scores[:, None, :].expand(batch, kv_heads, n).contiguous()
