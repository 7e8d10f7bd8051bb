"""Merging the decode kernel's split partials in torch: the log-sum-exp algebra of flash-decoding.

Attention over keys split into sequence ranges is recovered exactly from each range's unnormalised output,
running maximum and normaliser (Dao et al. 2023, "Flash-Decoding for long-context inference"). The layer
path merges in its epilogue kernel (:mod:`.epilogue`); this is the merge of the standalone
:func:`~.dispatch.fibquant_decode_attention`, whose (out, lse) the benchmark and tests read.
"""

from __future__ import annotations

import torch


def merge_splits(
    acc: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a kernel's split partials along dim 2: unnormalised ``acc (..., split, rows, d)``, natural-log
    running ``row_max`` and normaliser ``row_sum (..., split, rows)``. Returns the normalised output and lse;
    rows no split saw get 0 / -inf."""
    top = row_max.amax(dim=2, keepdim=True)
    weight = torch.exp(row_max - top.clamp_min(-1e30))  # 0 for empty splits
    total = (row_sum * weight).sum(dim=2)
    out = (acc * weight.unsqueeze(-1)).sum(dim=2)
    seen = total > 0
    out = torch.where(
        seen.unsqueeze(-1), out / total.clamp_min(1e-30).unsqueeze(-1), torch.zeros_like(out)
    )
    lse = torch.where(
        seen,
        top.squeeze(2) + torch.log(total.clamp_min(1e-30)),
        torch.full_like(total, float("-inf")),
    )
    return out, lse
