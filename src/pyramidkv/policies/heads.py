"""Head-adaptive budgets: one layer's budget shared across its KV heads by a layer-wide top-k (Ada-KV).

Ada-KV (Feng et al. 2024, arXiv 2407.11550) observed that heads differ in how concentrated their attention
is: a focused head loses little when it keeps few tokens, a dispersed one loses much. So instead of ``B``
tokens per head, a layer keeps the ``B x H`` highest-scoring (head, token) pairs of its ``H`` KV heads, and
each head keeps as many as it wins. A floor (a share ``floor`` of ``B``, Ada-KV's safeguard, never less than
the observation window) keeps every head usable. The counts go to :func:`pyramidkv.policies.select` as
per-head budgets, and the cache stores each (sequence, KV head) row at its own length: real memory, no mask
over a full-size cache. The layer's total, and so its bytes, equal those of the uniform split.

The scores of the observation-window scorer are sums of softmax attention, which every head spends in the
same total, so they compare across heads as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyramidkv.checks import check_number

DEFAULT_FLOOR = 0.2  # Ada-KV's safeguard: each head keeps at least this share of the average budget


def head_budgets(
    scores: Tensor, valid: Tensor, budgets: Tensor, window: int, floor: float = DEFAULT_FLOOR
) -> Tensor:
    """(batch, kv_heads) tokens each head keeps, summing per row to ``budgets * kv_heads`` (clipped to what
    the row holds).

    ``scores`` (batch, kv_heads, n), higher = keep (``+inf`` for the window); ``valid`` (batch, n) bool;
    ``budgets`` (batch,) tokens per head on average, window included.
    """
    check_number("floor", floor, 0, 1)
    batch, heads, n = scores.shape
    valid = valid.to(scores.device)
    counts = valid.sum(dim=1)
    keep = torch.minimum(budgets.to(device=scores.device, dtype=torch.long), counts)
    # each head's guaranteed share: the floor, and at least the window, which select() always keeps
    least = torch.maximum(
        torch.ceil(keep.double() * floor).long(), keep.clamp(max=int(window))
    ).clamp(max=keep)  # (batch,)
    # comparable keys: padding below everything, NaN below every real score, infinities kept in order
    ranked = torch.nan_to_num(scores.float(), nan=-3e38, posinf=3e38, neginf=-3e38)
    ranked = ranked.masked_fill(~valid[:, None, :], float("-inf"))
    ordered = ranked.sort(dim=-1, descending=True).values  # (batch, heads, n), best first per head
    # the pairs beyond each head's floor compete across heads for what the floors leave
    rank = torch.arange(n, device=scores.device)
    contested = ordered.masked_fill(rank < least[:, None, None], float("-inf")).flatten(1)
    spare = keep * heads - least * heads  # (batch,)
    order = contested.argsort(dim=-1, descending=True, stable=True)
    won = torch.zeros_like(contested, dtype=torch.bool)
    won.scatter_(-1, order, torch.arange(heads * n, device=scores.device) < spare[:, None])
    won &= contested > float("-inf")
    return least[:, None] + won.view(batch, heads, n).sum(dim=-1)
