"""Which prompt tokens to keep: scorers, selection and the named policies (pure tensor code).

``get_policy("pyramidkv")`` gives a :class:`Policy`; the cache glue calls ``policy.scorer.score(...)``
on the prefill queries and keys, ``policy.schedule.layer_budgets(...)`` for the per-layer budgets, and
:func:`select` for the indices to gather.
"""

from pyramidkv.policies.accumulated_attention import AccumulatedAttentionScorer
from pyramidkv.policies.base import Scorer, select
from pyramidkv.policies.key_norm import KeyNormScorer
from pyramidkv.policies.presets import DEFAULT_WINDOW, POLICY_NAMES, Policy, get_policy
from pyramidkv.policies.random import RandomScorer
from pyramidkv.policies.sinks_recent import SinksRecentScorer
from pyramidkv.policies.window_attention import POOLINGS, WindowAttentionScorer

__all__ = [
    "DEFAULT_WINDOW",
    "POLICY_NAMES",
    "POOLINGS",
    "AccumulatedAttentionScorer",
    "KeyNormScorer",
    "Policy",
    "RandomScorer",
    "Scorer",
    "SinksRecentScorer",
    "WindowAttentionScorer",
    "get_policy",
    "select",
]
