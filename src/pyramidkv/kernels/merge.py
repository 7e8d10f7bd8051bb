"""Merging attention computed over disjoint key sets: the log-sum-exp algebra of flash-decoding.

Attention over keys split into parts (sequence splits of one block, coded blocks, the fp16 recent window)
is recovered exactly from each part's normalised output and its log-sum-exp (Dao et al. 2023,
"Flash-Decoding for long-context inference"): out = sum_i exp(lse_i - lse) out_i, lse = logsumexp_i lse_i.
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


def merge_partials(
    parts: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``(out, lse)`` attention results over disjoint key sets into the result over their union.

    out_i (..., dim) is normalised over set i and lse_i (...) its natural-log normaliser;
    out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i. Rows no part sees stay 0 / -inf.
    """
    if not parts:
        raise ValueError("parts must hold at least one (out, lse) pair, got none")
    lse_all = torch.stack([lse.float() for _, lse in parts])
    lse = torch.logsumexp(lse_all, dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(lse_all - safe)  # exp(-inf) = 0 for empty parts and rows
    out = sum(w.unsqueeze(-1) * o.float() for w, (o, _) in zip(weights, parts, strict=True))
    return out, lse


def window_partial(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``query`` (b, q_heads, q, d) over the fp16 window (b, kv_heads, w, d), for merging.

    ``visible``: bool mask broadcastable to (b, kv_heads, q, w) (e.g. causal inside the window), or None.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, width = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    q = query.float().reshape(batch, kv_heads, group * q_len, dim)
    scores = q @ keys.float().transpose(-1, -2) * scaling
    if visible is not None:
        seen = visible.expand(batch, kv_heads, q_len, width).repeat(1, 1, group, 1)
        scores = scores.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(
        scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1)
    )
    out = weights @ values.float()
    return out.reshape(batch, q_heads, q_len, dim), lse.reshape(batch, q_heads, q_len)
