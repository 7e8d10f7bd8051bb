"""Differences between the transformers 5.x releases this project supports (5.17 to 5.25 seen)."""

from __future__ import annotations

import inspect
from functools import cache

import torch


@cache
def _cache_argument(model_class: type) -> str:
    """Newer releases renamed the forward argument ``past_key_values`` to ``cache`` (the old name warns)."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def first_positions(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Positions of the first new token of each row, as the model hands them to a cache layer's ``update``;
    ``None`` when this release hands none. 5.24+ passes the model's keyword arguments (``position_ids``);
    earlier releases pass a ``cache_kwargs`` dict with ``cache_position``."""
    found = kwargs.get("kwargs") or kwargs.get("cache_kwargs") or (args[0] if args else None)
    if not isinstance(found, dict):
        return None
    positions = found.get("position_ids")
    if positions is None:
        positions = found.get("cache_position")
    if not isinstance(positions, torch.Tensor) or positions.numel() == 0:
        return None
    return positions[..., 0]


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` with the argument name this model's forward and generate take."""
    return {_cache_argument(type(model)): cache}
