"""Named eviction policies: a scorer (which tokens) times a schedule (how many per layer).

=============  ==============================  ==============  ==========================================
name           scorer                          schedule        options (``get_policy(name, **options)``)
=============  ==============================  ==============  ==========================================
pyramidkv      observation-window attention    pyramid         window, kernel_size, pooling, beta
snapkv         observation-window attention    uniform         window, kernel_size, pooling
h2o            accumulated attention           uniform         window, block_size
streamingllm   sinks + recent                  uniform         window, sinks
key-norm       minus key L2 norm               uniform         window
random         seeded uniform noise            uniform         window, seed
full           none: keep everything           —               —
=============  ==============================  ==============  ==========================================

Defaults: ``window = 8``, ``kernel_size = 7``, ``pooling = "max"`` — the values the PyramidKV authors use
for SnapKV, PyramidKV, H2O and L2-norm in their LongBench runs (KVCache-Factory ``run_longbench.py``:
``window_sizes = 8``, ``kernel_sizes = 7``, ``pooling = "maxpool"``; the library-level defaults there,
32 / 5 / avg, are overridden by that script), so
``pyramidkv`` and ``snapkv`` differ only in the schedule. ``beta = 20`` (KVCache-Factory
``PyramidKVCluster``, kvpress ``PyramidKVPress``), ``sinks = 4`` (StreamingLLM; KVCache-Factory keeps
budget - 4 recent tokens), ``seed = 0``, ``block_size = 256`` (memory only, not a method parameter).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyramidkv.budgets import Budget, parse_budget
from pyramidkv.checks import check_int
from pyramidkv.errors import PyramidKVError
from pyramidkv.policies.accumulated_attention import AccumulatedAttentionScorer
from pyramidkv.policies.base import Scorer
from pyramidkv.policies.key_norm import KeyNormScorer
from pyramidkv.policies.random import RandomScorer
from pyramidkv.policies.schedules import PyramidSchedule, Schedule, UniformSchedule
from pyramidkv.policies.sinks_recent import SinksRecentScorer
from pyramidkv.policies.window_attention import WindowAttentionScorer

POLICY_NAMES = ("pyramidkv", "snapkv", "h2o", "streamingllm", "key-norm", "random", "full")
DEFAULT_WINDOW = 8

# name -> (scorer class, its options, schedule class, its options); window is accepted by all but full.
_PRESETS: dict[str, tuple[type | None, tuple[str, ...], type, tuple[str, ...]]] = {
    "pyramidkv": (WindowAttentionScorer, ("kernel_size", "pooling"), PyramidSchedule, ("beta",)),
    "snapkv": (WindowAttentionScorer, ("kernel_size", "pooling"), UniformSchedule, ()),
    "h2o": (AccumulatedAttentionScorer, ("block_size",), UniformSchedule, ()),
    "streamingllm": (SinksRecentScorer, ("sinks",), UniformSchedule, ()),
    "key-norm": (KeyNormScorer, (), UniformSchedule, ()),
    "random": (RandomScorer, ("seed",), UniformSchedule, ()),
    "full": (None, (), UniformSchedule, ()),
}


@dataclass
class Policy:
    """An eviction policy: ``scorer`` ranks tokens, ``schedule`` sets per-layer budgets, and the last
    ``window`` prompt tokens are always kept. ``scorer is None`` means no compression ("full")."""

    name: str
    scorer: Scorer | None
    schedule: Schedule
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        check_int("window", self.window, 1)
        if self.scorer is not None and not callable(getattr(self.scorer, "score", None)):
            raise PyramidKVError(
                f"scorer: got {self.scorer!r}; expected an object with a score() method"
            )
        if not callable(getattr(self.schedule, "layer_budgets", None)):
            raise PyramidKVError(
                f"schedule: got {self.schedule!r}; expected an object with a layer_budgets() method"
            )

    def is_full(self) -> bool:
        """True when the policy keeps every token (no scorer)."""
        return self.scorer is None

    def layer_budgets(
        self, budget: str | int | float | Budget, n_layers: int, prompt_len: int
    ) -> list[int]:
        """Tokens each layer keeps for one sequence of ``prompt_len`` real tokens (all of them if full)."""
        if self.is_full():
            return [int(prompt_len)] * int(n_layers)
        tokens = parse_budget(budget).tokens_for(prompt_len)
        return self.schedule.layer_budgets(tokens, n_layers, prompt_len, self.window)


def get_policy(name: str, **overrides) -> Policy:
    """The preset ``name`` (see :data:`POLICY_NAMES`), with ``overrides`` applied to its parts.

    Names are matched case-insensitively, ``_`` reading as ``-``. Overrides given as ``None`` are ignored
    (convenient for optional CLI flags); any other override the preset does not take raises a
    ``ValueError`` that names it and lists the ones it takes. Values are validated by the part they go to.
    """
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
    if key not in _PRESETS:
        raise PyramidKVError(f"policy: got {name!r}; expected one of {', '.join(POLICY_NAMES)}")
    scorer_cls, scorer_keys, schedule_cls, schedule_keys = _PRESETS[key]
    accepted = (*scorer_keys, *schedule_keys, *(("window",) if scorer_cls else ()))
    given = {option: value for option, value in overrides.items() if value is not None}
    for option in given:
        if option not in accepted:
            takes = ", ".join(accepted) if accepted else "no options"
            raise PyramidKVError(f"{option}: not an option of policy {key!r}; it takes {takes}")
    scorer = scorer_cls(**_pick(given, scorer_keys)) if scorer_cls else None
    schedule = schedule_cls(**_pick(given, schedule_keys))
    return Policy(key, scorer, schedule, given.get("window", DEFAULT_WINDOW))


def _pick(options: dict, keys: tuple[str, ...]) -> dict:
    return {k: options[k] for k in keys if k in options}
