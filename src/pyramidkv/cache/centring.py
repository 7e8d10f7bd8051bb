"""Centred keys: a coded layer stores every key minus one shift per (row, KV head), the keys its prompt's
observation window attends to, averaged by that attention.

Why a shift at all. ``softmax(q.(k_i - m))`` equals ``softmax(q.k_i)`` for any ``m`` (a constant per query),
so a layer may store ``k_i - m`` and attend with no correction. A code of norm and direction (FibQuant,
TurboQuant) errs in proportion to the norm of what it codes, and the keys of a head share a large common
direction (most of their length on Gemma 3, ~0.75 of it on SmolLM2: ``benchmarks/key_geometry.py``).

Why this shift. What moves the attention output is the logit error on the tokens the queries attend to: on
SmolLM2 those are often outliers far from the keys' plain mean (attention sinks), and subtracting the plain
mean lengthens them, so the plain mean cut the logit error averaged over all keys by 25-45% yet raised the KL
from the full cache by 40-65% at 2 and 3 bits. The attention-weighted mean of the keys (weights: the
observation window's attention, averaged over its queries and the query heads of a KV head) minimises the
attended keys' squared norm, ``sum_i p_i |k_i - m|^2``, which bounds the attended logit error of such a code.
Measured (``benchmarks/centred_keys.py``, benchmarks/README.md): FibQuant's KL falls by 13% at 2 bits and
stays within noise at 3 bits on SmolLM2, and falls by 51% (2 bits) to 82% (3 bits) on Gemma 3 270M. The same
motive, the inner-product error on the tokens that matter, is behind TurboQuant's unbiased estimator (Zandieh
et al. 2025, arXiv 2504.19874).
"""

from __future__ import annotations

import torch


def centred(keys: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``keys`` minus a layer's key ``shift`` (arithmetic in float32 at least, the keys' dtype), or as they are
    without one."""
    if shift is None:
        return keys
    compute = torch.promote_types(keys.dtype, torch.float32)
    return (keys.to(compute) - shift.to(compute)).to(keys.dtype)


def uncentred(keys: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """Stored keys as the model made them: the ``shift`` added back."""
    if shift is None:
        return keys
    compute = torch.promote_types(keys.dtype, torch.float32)
    return (keys.to(compute) + shift.to(compute)).to(keys.dtype)


def attended_mean(
    keys: torch.Tensor, queries: torch.Tensor, valid: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The shift of a layer's keys (batch, kv_heads, n, d): their mean weighted by the attention of
    ``queries`` (batch, q_heads, w, d), the prompt's last ``w`` positions (causal among them), over the
    ``valid`` (batch, n) keys, averaged over the queries and the query heads of each KV head (module
    docstring). Returns (batch, kv_heads, 1, d) in the keys' dtype; float32 arithmetic."""
    batch, heads, n, dim = keys.shape
    group, window = queries.shape[1] // heads, queries.shape[-2]
    grouped = queries.float().reshape(batch, heads, group * window, dim)
    scores = grouped @ keys.float().transpose(-1, -2) * scaling
    # row r is query r mod window of its group, at column n - window + (r mod window)
    last = (n - window + torch.arange(window, device=keys.device)).repeat(group)
    seen = torch.arange(n, device=keys.device) <= last[:, None]
    seen = seen & valid.to(keys.device)[:, None, None, :]
    weights = scores.masked_fill(~seen, float("-inf")).softmax(dim=-1).mean(dim=-2, keepdim=True)
    return (weights @ keys.float()).to(keys.dtype)
