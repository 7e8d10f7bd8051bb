"""Named eviction policies: a scorer (which tokens) times a schedule (how many per layer).

=============  ==============================  ==============  ==========================================
name           scorer                          schedule        options (``get_policy(name, **options)``)
=============  ==============================  ==============  ==========================================
pyramidkv      observation-window attention    pyramid         window, kernel_size, pooling, beta
snapkv         observation-window attention    uniform         window, kernel_size, pooling
adakv          observation-window attention    uniform         window, kernel_size, pooling, head_floor
                                               + heads shared
pyramidkv-     observation-window attention    adaptive        window, kernel_size, pooling, tau1, tau2
adaptive
h2o            accumulated attention           uniform         window, block_size
streamingllm   sinks + recent                  uniform         window, sinks
key-norm       minus key L2 norm               uniform         window
random         seeded uniform noise            uniform         window, seed
full           none: keep everything           —               —
=============  ==============================  ==============  ==========================================

Every preset with a scorer also takes ``schedule`` (``"uniform"``, ``"pyramid"`` or ``"adaptive"``: layer
budgets from each layer's attention, :mod:`.adaptive`) and ``heads`` (``"uniform"``, or ``"adaptive"``: a
layer's budget shared across its KV heads by a layer-wide top-k, :mod:`.heads`), so any scorer can take an
adaptive schedule. ``adakv`` is Ada-KV over SnapKV's scores (Feng et al. 2024); ``pyramidkv-adaptive`` sizes
layers by CAKE's preference (Qin et al. 2025). Shared heads store a layer's rows at its longest head's
length, so they take a token budget, not a byte budget (``kv_memory``), which they could not meet.

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
from pyramidkv.checks import check_choice, check_int, check_number
from pyramidkv.errors import PyramidKVError
from pyramidkv.policies.accumulated_attention import AccumulatedAttentionScorer
from pyramidkv.policies.adaptive import AdaptiveSchedule
from pyramidkv.policies.base import Scorer
from pyramidkv.policies.heads import DEFAULT_FLOOR
from pyramidkv.policies.key_norm import KeyNormScorer
from pyramidkv.policies.random import RandomScorer
from pyramidkv.policies.schedules import PyramidSchedule, Schedule, UniformSchedule
from pyramidkv.policies.sinks_recent import SinksRecentScorer
from pyramidkv.policies.window_attention import WindowAttentionScorer

POLICY_NAMES = (
    "pyramidkv",
    "snapkv",
    "adakv",
    "pyramidkv-adaptive",
    "h2o",
    "streamingllm",
    "key-norm",
    "random",
    "full",
)
HEAD_SPLITS = ("uniform", "adaptive")
SCHEDULES = {"uniform": UniformSchedule, "pyramid": PyramidSchedule, "adaptive": AdaptiveSchedule}
_SCHEDULE_OPTIONS = {"uniform": (), "pyramid": ("beta",), "adaptive": ("tau1", "tau2")}
DEFAULT_WINDOW = 8

# name -> (scorer class, its options, schedule, heads); window, schedule, heads and the chosen schedule's and
# head split's options are accepted by every preset with a scorer.
_PRESETS: dict[str, tuple[type | None, tuple[str, ...], str, str]] = {
    "pyramidkv": (WindowAttentionScorer, ("kernel_size", "pooling"), "pyramid", "uniform"),
    "snapkv": (WindowAttentionScorer, ("kernel_size", "pooling"), "uniform", "uniform"),
    "adakv": (WindowAttentionScorer, ("kernel_size", "pooling"), "uniform", "adaptive"),
    "pyramidkv-adaptive": (
        WindowAttentionScorer,
        ("kernel_size", "pooling"),
        "adaptive",
        "uniform",
    ),
    "h2o": (AccumulatedAttentionScorer, ("block_size",), "uniform", "uniform"),
    "streamingllm": (SinksRecentScorer, ("sinks",), "uniform", "uniform"),
    "key-norm": (KeyNormScorer, (), "uniform", "uniform"),
    "random": (RandomScorer, ("seed",), "uniform", "uniform"),
    "full": (None, (), "uniform", "uniform"),
}


@dataclass
class Policy:
    """An eviction policy: ``scorer`` ranks tokens, ``schedule`` sets per-layer budgets, ``heads`` splits a
    layer's budget over its KV heads (``"uniform"``: the same count each; ``"adaptive"``: a layer-wide top-k
    with each head keeping at least ``head_floor`` of the average, :mod:`.heads`), and the last ``window``
    prompt tokens are always kept. ``scorer is None`` means no compression ("full")."""

    name: str
    scorer: Scorer | None
    schedule: Schedule
    window: int = DEFAULT_WINDOW
    heads: str = "uniform"
    head_floor: float = DEFAULT_FLOOR

    def __post_init__(self) -> None:
        check_int("window", self.window, 1)
        check_choice("heads", self.heads, HEAD_SPLITS)
        check_number("head_floor", self.head_floor, 0, 1)
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
    scorer_cls, scorer_keys, schedule_name, heads = _PRESETS[key]
    given = {option: value for option, value in overrides.items() if value is not None}
    if scorer_cls is not None:
        schedule_name = check_choice("schedule", given.get("schedule", schedule_name), SCHEDULES)
        heads = check_choice("heads", given.get("heads", heads), HEAD_SPLITS)
    schedule_keys = _SCHEDULE_OPTIONS[schedule_name]
    accepted = scorer_keys + schedule_keys
    if scorer_cls is not None:
        accepted += (
            "window",
            "schedule",
            "heads",
            *(("head_floor",) if heads == "adaptive" else ()),
        )
    for option in given:
        if option not in accepted:
            takes = ", ".join(accepted) if accepted else "no options"
            raise PyramidKVError(f"{option}: not an option of policy {key!r}; it takes {takes}")
    scorer = scorer_cls(**_pick(given, scorer_keys)) if scorer_cls else None
    schedule = SCHEDULES[schedule_name](**_pick(given, schedule_keys))
    return Policy(
        key,
        scorer,
        schedule,
        given.get("window", DEFAULT_WINDOW),
        heads,
        given.get("head_floor", DEFAULT_FLOOR),
    )


def _pick(options: dict, keys: tuple[str, ...]) -> dict:
    return {k: options[k] for k in keys if k in options}
