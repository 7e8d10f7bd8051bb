"""Random eviction: the floor every scoring method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from pyramidkv.checks import check_int
from pyramidkv.policies.base import check_inputs


@dataclass(frozen=True)
class RandomScorer:
    """Uniform random scores, seeded: the baseline that uses no information at all.

    Scores come from a CPU generator seeded with ``seed``, one draw of (KV heads, tokens) shared by every row
    of the batch, so the same prompt length gives the same scores on every device, at every call and whether
    layers are scored one by one or batched (``CompressedCache(compress_after=...)``): runs repeat exactly.
    Every layer draws the same scores; with one budget per layer it keeps the same positions in each.
    Change ``seed`` to draw another subset.
    """

    seed: int = 0
    needs_all_queries: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_int("seed", self.seed, 0)

    def score(self, queries: Tensor, keys: Tensor, valid: Tensor, scaling: float) -> Tensor:
        batch, kv_heads, _, _, n = check_inputs(queries, keys, valid)
        generator = torch.Generator(device="cpu").manual_seed(int(self.seed))
        scores = torch.rand(kv_heads, n, generator=generator, dtype=torch.float32)
        return scores.to(keys.device).expand(batch, kv_heads, n)
