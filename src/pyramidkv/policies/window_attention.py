"""Observation-window attention: the scorer of SnapKV and PyramidKV.

SnapKV (Li et al. 2024, arXiv 2404.14469) observed that the last few prompt queries — the *observation
window* — already attend to the tokens generation will need. PyramidKV (Cai et al. 2024, arXiv
2406.02069) scores tokens the same way and only changes the per-layer budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from pyramidkv.checks import check_int
from pyramidkv.errors import PyramidKVError
from pyramidkv.policies.base import attention_weights, check_inputs

POOLINGS = ("max", "avg", "none")


@dataclass(frozen=True)
class WindowAttentionScorer:
    """Attention the observation window pays to each earlier token, smoothed along the sequence.

    For each query head: the softmax attention ``softmax(q_i K^T * scaling)`` (float32, causal inside the
    window, padding masked) of each of the Q window queries, summed over the window; the window's own
    positions are left out (zero) and the prefix is pooled along the key axis with a 1-D ``kernel_size``
    window (stride 1, same length, zero/-inf padding at the edges), so a token's neighbours are kept with
    it and the selection does not shred phrases. The pooled scores are then averaged inside each GQA group
    to give one score per KV head. Positions in the observation window score ``+inf``: they are the
    observers and are always kept.

    Defaults (kernel 7, max pooling) are those of the PyramidKV authors' LongBench runs
    (KVCache-Factory ``run_longbench.py``: ``kernel_sizes = 7``, ``pooling = "maxpool"``); the sum over
    window queries follows their ``pyramidkv_utils.py``.
    """

    kernel_size: int = 7
    pooling: str = "max"
    needs_all_queries: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if check_int("kernel_size", self.kernel_size, 1) % 2 == 0:
            raise PyramidKVError(
                f"kernel_size: got {self.kernel_size!r}; expected an odd integer >= 1 (7 by default)"
            )
        if self.pooling not in POOLINGS:
            raise PyramidKVError(
                f"pooling: got {self.pooling!r}; expected one of {', '.join(POOLINGS)}"
            )

    def score(self, queries: Tensor, keys: Tensor, valid: Tensor, scaling: float) -> Tensor:
        batch, kv_heads, groups, q_len, n = check_inputs(queries, keys, valid)
        first = n - q_len
        weights = attention_weights(queries, keys, valid, scaling, first)  # (B, Hkv, G, Q, n)
        summed = weights.sum(dim=3)  # (B, Hkv, G, n)
        summed[..., first:] = 0.0
        pooled = self._pool(summed.reshape(batch, kv_heads * groups, n))
        scores = pooled.reshape(batch, kv_heads, groups, n).mean(dim=2)
        scores[..., first:] = float("inf")
        return scores

    def _pool(self, x: Tensor) -> Tensor:
        if self.pooling == "none" or self.kernel_size == 1:
            return x
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        return pool(x, kernel_size=self.kernel_size, stride=1, padding=self.kernel_size // 2)
