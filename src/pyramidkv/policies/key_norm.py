"""Key norm: keep the keys with the smallest L2 norm (Devoto et al. 2024, arXiv 2406.11430)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from pyramidkv.policies.base import check_inputs


@dataclass(frozen=True)
class KeyNormScorer:
    """Score = minus the L2 norm of the key (float32): a low key norm marks an important token.

    Devoto et al. ("A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024)
    found that keys with a low norm draw high attention, so the norm alone, with no query and no
    attention, ranks tokens. One score per KV head, as in kvpress ``KnormPress``. KVCache-Factory's
    version also leaves layers 0 and 1 uncompressed; here every layer follows the schedule.
    """

    needs_all_queries: ClassVar[bool] = False

    def score(self, queries: Tensor, keys: Tensor, valid: Tensor, scaling: float) -> Tensor:
        check_inputs(queries, keys, valid)
        return -keys.float().norm(dim=-1)
