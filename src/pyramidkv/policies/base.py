"""What every eviction policy shares: the :class:`Scorer` protocol and :func:`select`.

A policy is a scorer (how important is each prompt token, per KV head) times a schedule (how many tokens
each layer keeps, :mod:`pyramidkv.budgets`). :func:`select` turns scores and a budget into the indices
to gather. Everything here works on plain tensors shaped like transformers' caches,
(batch, kv_heads, seq, head_dim), and never imports transformers.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from pyramidkv.checks import check_int
from pyramidkv.errors import PyramidKVError


class Scorer(Protocol):
    """Scores prompt tokens per KV head; higher means keep.

    ``needs_all_queries`` says which queries the caller passes: ``False``, only the last ``window`` prompt
    queries (SnapKV's observation window); ``True``, all prompt queries (H2O).
    """

    needs_all_queries: bool

    def score(self, queries: Tensor, keys: Tensor, valid: Tensor, scaling: float) -> Tensor:
        """Importance (batch, kv_heads, n) float32 of each of the n prompt tokens.

        ``queries`` (batch, q_heads, Q, D) are the last Q prompt positions, RoPE applied; ``keys``
        (batch, kv_heads, n, D), RoPE applied, with q_heads a multiple of kv_heads (GQA) or equal (MHA);
        ``valid`` (batch, n) bool is False at padding; ``scaling`` is the softmax scale (1/sqrt(D)).
        """
        ...


def check_inputs(queries: Tensor, keys: Tensor, valid: Tensor) -> tuple[int, int, int, int, int]:
    """Validate the shapes a scorer receives; return (batch, kv_heads, groups, Q, n)."""
    if queries.dim() != 4 or keys.dim() != 4:
        raise PyramidKVError(
            f"queries/keys: got shapes {tuple(queries.shape)} and {tuple(keys.shape)}; expected "
            "(batch, heads, seq, head_dim) for both"
        )
    batch, q_heads, q_len, dim = queries.shape
    k_batch, kv_heads, n, k_dim = keys.shape
    if k_batch != batch or k_dim != dim or kv_heads == 0 or q_heads % kv_heads:
        raise PyramidKVError(
            f"queries/keys: got shapes {tuple(queries.shape)} and {tuple(keys.shape)}; expected the "
            "same batch and head_dim, and query heads a multiple of KV heads"
        )
    if q_len > n:
        raise PyramidKVError(
            f"queries: got {q_len} query positions for {n} keys; expected at most {n}"
        )
    if valid.shape != (batch, n) or valid.dtype != torch.bool:
        raise PyramidKVError(
            f"valid: got shape {tuple(valid.shape)} dtype {valid.dtype}; expected ({batch}, {n}) bool"
        )
    return batch, kv_heads, q_heads // kv_heads, q_len, n


def attention_weights(
    queries: Tensor, keys: Tensor, valid: Tensor, scaling: float, first: int
) -> Tensor:
    """Float32 softmax attention of a block of queries over all keys, grouped by KV head.

    ``queries`` (batch, q_heads, b, D) sit at absolute positions ``first .. first + b - 1``. Query ``i``
    sees key ``j`` when ``j <= first + i`` (causal) and ``valid[:, j]``. Rows of padding queries (and
    rows that see nothing) are all zero, so they add nothing to any sum. Returns
    (batch, kv_heads, groups, b, n): query head ``h`` belongs to KV head ``h // groups``, as in
    transformers' ``repeat_kv``.
    """
    batch, q_heads, block, dim = queries.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    grouped = queries.float().reshape(batch, kv_heads, q_heads // kv_heads, block, dim)
    logits = torch.einsum("bhgqd,bhnd->bhgqn", grouped, keys.float()) * scaling
    positions = torch.arange(n, device=keys.device)
    query_pos = first + torch.arange(block, device=keys.device)
    sees = (positions[None, :] <= query_pos[:, None])[None] & valid[:, None, :]  # (batch, b, n)
    sees &= valid[:, first : first + block, None]
    sees = sees[:, None, None]
    logits.masked_fill_(~sees, torch.finfo(torch.float32).min)
    return torch.softmax(logits, dim=-1).mul_(sees)


def select(
    scores: Tensor, valid: Tensor, budgets: Tensor, window: int, kept: list[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Indices of the tokens to keep per (row, KV head), and how many there are.

    ``scores`` (batch, kv_heads, n), higher = keep; ``valid`` (batch, n) bool; ``budgets`` (batch,) long,
    tokens to keep per row, window included, or (batch, kv_heads) for a budget per KV head (head-adaptive
    policies, :mod:`.heads`); ``window`` >= 0. Rules:

    * padding positions are never kept;
    * the last ``min(window, budget)`` valid tokens are always kept (the observation window);
    * the rest of the budget goes to the highest-scoring other valid tokens, exact ties going to the more
      recent token; NaN scores count as lowest;
    * a row whose valid length is at most its budget keeps all its valid tokens.

    ``kept``: the tokens each row keeps, ``min(budget, valid count)``, when the caller knows them on the host
    (then the output's width is read from it, not from the device: no host synchronisation).

    Returns ``indices`` (batch, kv_heads, K) long, ascending within each row, with K the largest count
    kept, and ``lengths`` (batch, kv_heads) long. Slots at and past ``lengths[b, h]`` repeat the last kept
    index (0 for a row that keeps nothing), so a gather never goes out of range.
    """
    if scores.dim() != 3:
        raise PyramidKVError(
            f"scores: got shape {tuple(scores.shape)}; expected (batch, kv_heads, n)"
        )
    batch, kv_heads, n = scores.shape
    if valid.shape != (batch, n) or valid.dtype != torch.bool:
        raise PyramidKVError(
            f"valid: got shape {tuple(valid.shape)} dtype {valid.dtype}; expected ({batch}, {n}) bool"
        )
    integer = not (budgets.dtype.is_floating_point or budgets.dtype == torch.bool)
    if budgets.shape not in ((batch,), (batch, kv_heads)) or not integer:
        raise PyramidKVError(
            f"budgets: got shape {tuple(budgets.shape)} dtype {budgets.dtype}; expected ({batch},) or "
            f"({batch}, {kv_heads}) integer"
        )
    check_int("window", window, 0)
    budgets = budgets.to(device=scores.device, dtype=torch.long)
    if (
        kept is not None
    ):  # the caller's budgets, read on the host: nothing here waits for the device
        if len(kept) != batch or any(k < 0 for k in kept):
            raise PyramidKVError(f"kept: got {kept}; expected {batch} integers >= 0")
    elif batch and int(budgets.min()) < 0:
        raise PyramidKVError(f"budgets: got {budgets.tolist()}; expected integers >= 0")
    budgets = budgets.reshape(batch, -1).expand(batch, kv_heads)

    valid = valid.to(scores.device)
    counts = valid.sum(dim=1)  # (batch,)
    keep = torch.minimum(budgets, counts[:, None])  # (batch, kv_heads)
    from_end = counts[:, None] - valid.long().cumsum(dim=1)  # valid tokens after position j
    in_window = valid[:, None] & (from_end[:, None] < keep.clamp(max=int(window))[..., None])
    # Rank: window first, then other valid tokens by score, then padding; ties to the more recent token.
    tier = valid[:, None].long() + in_window.long()  # 2 window, 1 candidate, 0 padding
    ranked = torch.nan_to_num(scores.float(), nan=float("-inf")).flip(-1)
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    tiers = tier.flip(-1).gather(-1, order)
    order = order.gather(-1, tiers.argsort(dim=-1, descending=True, stable=True))
    chosen = (n - 1) - order  # positions, best first

    slots = torch.arange(n, device=scores.device)
    kept_mask = torch.zeros(batch, kv_heads, n, dtype=torch.bool, device=scores.device)
    kept_mask.scatter_(-1, chosen, slots < keep[..., None])
    # the caller's counts when given; else one read of the device
    width = min(max(kept, default=0), n) if kept is not None else int(keep.max()) if batch else 0
    ascending = torch.where(kept_mask, slots, n + slots).sort(dim=-1).values[..., :width]
    lengths = keep.contiguous()
    last = ascending.gather(-1, (lengths - 1).clamp(min=0)[..., None]) if width else ascending
    indices = torch.where(
        ascending < n, ascending, last.clamp(max=n - 1) * (lengths[..., None] > 0)
    )
    return indices, lengths
