"""Differences between the transformers 5.x releases this project supports (5.17 to 5.25 seen)."""

from __future__ import annotations

import inspect
from functools import cache


@cache
def _cache_argument(model_class: type) -> str:
    """Newer releases renamed the forward argument ``past_key_values`` to ``cache`` (the old name warns)."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` with the argument name this model's forward and generate take."""
    return {_cache_argument(type(model)): cache}
