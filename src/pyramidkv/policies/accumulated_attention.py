"""Accumulated attention: the "heavy hitter" scorer of H2O (Zhang et al. 2023, arXiv 2306.14048)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from pyramidkv.checks import check_int
from pyramidkv.policies.base import attention_weights, check_inputs


@dataclass(frozen=True)
class AccumulatedAttentionScorer:
    """Attention each token receives, summed over every prompt query: H2O's heavy hitters.

    Score of token j for one query head: ``sum_i softmax(q_i K^T * scaling)_j`` over all prompt queries i
    (causal, padding masked; padding queries add nothing), then averaged inside each GQA group. The sum is
    *not* divided by the number of queries that can see j (``n - j``): that is H2O's accumulation and the
    one KVCache-Factory's ``H2OKVCluster`` uses (``attn_weights.sum(dim=-2)``, no pooling). It favours
    early tokens, which see more queries — a known trait of H2O on long prompts.

    Queries are processed ``block_size`` at a time against the keys they can see, so peak memory is
    O(heads * block_size * n), never the full n x n attention matrix.
    """

    block_size: int = 256
    needs_all_queries: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1)

    def score(self, queries: Tensor, keys: Tensor, valid: Tensor, scaling: float) -> Tensor:
        batch, kv_heads, groups, q_len, n = check_inputs(queries, keys, valid)
        offset = n - q_len
        total = torch.zeros(batch, kv_heads, groups, n, dtype=torch.float32, device=keys.device)
        for start in range(0, q_len, self.block_size):
            stop = min(start + self.block_size, q_len)
            seen = offset + stop  # keys after the block's last query are masked anyway: skip them
            weights = attention_weights(
                queries[:, :, start:stop],
                keys[:, :, :seen],
                valid[:, :seen],
                scaling,
                offset + start,
            )
            total[..., :seen] += weights.sum(dim=3)
        return total.mean(dim=2)
