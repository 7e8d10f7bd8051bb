"""Token budgets: what the user asks for (:class:`Budget`) and how it is spread over layers (schedules).

A budget is the *average* number of prompt tokens each layer keeps, the observation window included. The
user states it as tokens (``128``) or as a fraction of the prompt (``"10%"``, ``0.1``); a schedule turns
it into one integer per layer:

* :class:`UniformSchedule` — every layer keeps the same number (SnapKV, H2O, StreamingLLM, ...).
* :class:`PyramidSchedule` — lower layers keep more, upper layers fewer, on a straight line whose slope is
  set by ``beta`` (PyramidKV, Cai et al. 2024, arXiv 2406.02069).

Both keep the total over layers at exactly ``n_layers * budget`` whenever the prompt is longer than the
budget, so methods compared at the same budget hold the same number of tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real
from typing import Protocol

from pyramidkv.errors import PyramidKVError

_ACCEPTED = (
    "a token count (an integer >= 1, e.g. 128 or '128'), a percentage of the prompt in (0%, 100%] "
    "(e.g. '10%') or a fraction of the prompt in (0, 1] (e.g. 0.25)"
)


def _budget_error(value: object, why: str = "") -> PyramidKVError:
    reason = f" ({why})" if why else ""
    return PyramidKVError(f"budget: got {value!r}{reason}; expected {_ACCEPTED}")


@dataclass(frozen=True)
class Budget:
    """The budget a user asked for: exactly one of ``tokens`` or ``fraction``.

    ``tokens`` is the average number of tokens kept per layer, window included; ``fraction`` is that
    average as a share of the prompt, in (0, 1]. Build one from user text with :func:`parse_budget`.
    """

    tokens: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.fraction is None):
            raise PyramidKVError(
                f"budget: give exactly one of tokens or fraction, got tokens={self.tokens!r}, "
                f"fraction={self.fraction!r}"
            )
        if self.tokens is not None and (
            isinstance(self.tokens, bool)
            or not isinstance(self.tokens, Integral)
            or self.tokens < 1
        ):
            raise _budget_error(self.tokens, "tokens must be an integer >= 1")
        if self.fraction is not None and (
            isinstance(self.fraction, bool)
            or not isinstance(self.fraction, Real)
            or not math.isfinite(self.fraction)
            or not 0 < self.fraction <= 1
        ):
            raise _budget_error(self.fraction, "a fraction must lie in (0, 1]")

    def tokens_for(self, prompt_len: int) -> int:
        """Average tokens per layer for a prompt of ``prompt_len`` real tokens, in [1, prompt_len].

        A token budget is clamped to the prompt (a layer cannot keep more than it saw). A fraction is
        rounded *up*, ``ceil(fraction * prompt_len)``, so at least the asked share is kept and any
        prompt keeps at least one token; the product is taken on the exact rational value of the
        fraction (``0.1 * 30`` is 3, not 4).
        """
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, Integral) or prompt_len < 1:
            raise PyramidKVError(f"prompt_len: got {prompt_len!r}; expected an integer >= 1")
        if self.tokens is not None:
            return min(int(self.tokens), int(prompt_len))
        exact = Fraction(self.fraction).limit_denominator(10**9) * int(prompt_len)
        return max(1, min(int(prompt_len), math.ceil(exact)))

    def __str__(self) -> str:
        if self.tokens is not None:
            return str(self.tokens)
        return f"{self.fraction * 100:g}%"


_INTEGER = re.compile(r"[+-]?\d+")


def parse_budget(spec: str | int | float | Budget) -> Budget:
    """Read a budget: ``128`` / ``"128"`` -> tokens, ``"10%"`` / ``0.1`` / ``"0.1"`` -> fraction.

    Integers (and integer-looking strings) are token counts; floats and decimal strings are fractions and
    must lie in (0, 1]; a string ending in ``%`` is a percentage in (0, 100]. Anything else (zero,
    negatives, NaN, ``"abc"``, a float above 1 such as ``128.0``) raises a ``ValueError`` that names
    ``budget``, the value and what is accepted. Byte budgets (``"48MiB"``) are not accepted yet.
    """
    if isinstance(spec, Budget):
        return spec
    if isinstance(spec, bool):
        raise _budget_error(spec, "a bool is not a budget")
    if isinstance(spec, Integral):
        return Budget(tokens=int(spec))
    if isinstance(spec, Real):
        return Budget(fraction=_as_fraction(float(spec), spec))
    if not isinstance(spec, str):
        raise _budget_error(spec, f"type {type(spec).__name__} is not accepted")
    text = spec.strip()
    if text.endswith("%"):
        number = _as_float(text[:-1].strip(), spec)
        if not 0 < number <= 100:
            raise _budget_error(spec, "a percentage must lie in (0%, 100%]")
        return Budget(fraction=number / 100)
    if _INTEGER.fullmatch(text):
        return Budget(tokens=_as_tokens(int(text), spec))
    return Budget(fraction=_as_fraction(_as_float(text, spec), spec))


def _as_float(text: str, spec: object) -> float:
    try:
        number = float(text)
    except ValueError:
        raise _budget_error(spec, "not a number") from None
    if not math.isfinite(number):
        raise _budget_error(spec, "not a finite number")
    return number


def _as_tokens(number: int, spec: object) -> int:
    if number < 1:
        raise _budget_error(spec, "tokens must be >= 1")
    return number


def _as_fraction(number: float, spec: object) -> float:
    if not math.isfinite(number) or not 0 < number <= 1:
        raise _budget_error(
            spec, "a fraction must lie in (0, 1]; write a token count as an integer"
        )
    return number


class Schedule(Protocol):
    """Spreads an average per-layer budget over the layers of a model."""

    def layer_budgets(self, budget: int, n_layers: int, prompt_len: int, window: int) -> list[int]:
        """Tokens each layer keeps (window included), bottom layer first."""
        ...


def _check_schedule_args(budget: int, n_layers: int, prompt_len: int, window: int) -> None:
    for name, value, low in (
        ("budget", budget, 1),
        ("n_layers", n_layers, 1),
        ("prompt_len", prompt_len, 1),
        ("window", window, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
            raise PyramidKVError(f"{name}: got {value!r}; expected an integer >= {low}")


@dataclass(frozen=True)
class UniformSchedule:
    """Every layer keeps the same ``budget`` tokens (clamped to the prompt): SnapKV, H2O, StreamingLLM."""

    def layer_budgets(self, budget: int, n_layers: int, prompt_len: int, window: int) -> list[int]:
        _check_schedule_args(budget, n_layers, prompt_len, window)
        return [min(int(budget), int(prompt_len))] * int(n_layers)


@dataclass(frozen=True)
class PyramidSchedule:
    """PyramidKV's per-layer budgets: a straight line from many tokens at the bottom to few at the top.

    With average budget ``B`` (window ``w`` included), ``L`` layers and a prompt of ``n`` tokens, the
    prefix budget ``s = B - w`` is spread as (Cai et al. 2024; ``beta = 20`` is the authors'
    default in KVCache-Factory ``pyramidkv/pyramidkv_utils.py`` and in kvpress ``PyramidKVPress``)::

        k_min = s / beta,   k_max = 2 s - k_min,   k_l = k_max - l (k_max - k_min) / (L - 1)

    and layer ``l`` (0 = bottom) keeps ``k_l + w`` tokens. The mean of ``k_l`` is ``s``, so the total is
    ``L * B``. When ``k_max + w`` would exceed the prompt, ``k_max`` is clamped to ``n - w`` and ``k_min``
    re-derived as ``2 s - k_max`` so the total is still ``L * B``.

    Unlike the reference code (integer division, total off by up to ``L - 1`` tokens) the real-valued
    targets are computed exactly (rationals) and apportioned by largest remainder, under the constraint
    that budgets stay non-increasing with depth and inside ``[max(w, 1), n]``: every layer gets the
    floor or the ceiling of its target and the total is exactly ``L * B``.

    Regimes where the line does not apply:

    * ``n <= B``: nothing to compress, every layer keeps all ``n`` tokens (total ``L * n``).
    * ``L == 1``: the single layer keeps ``B``.
    * ``B <= w``: no prefix budget to spread, every layer keeps ``B`` (the most recent tokens).

    ``beta`` must be >= 1: below 1, ``k_min > k_max`` and upper layers would get *more* than the bottom
    (kvpress asserts the same).
    """

    beta: float = 20.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.beta, bool)
            or not isinstance(self.beta, Real)
            or not math.isfinite(self.beta)
            or self.beta < 1
        ):
            raise PyramidKVError(
                f"beta: got {self.beta!r}; expected a finite number >= 1 (20 in the PyramidKV paper; "
                "larger is steeper, 1 is uniform)"
            )

    def layer_budgets(self, budget: int, n_layers: int, prompt_len: int, window: int) -> list[int]:
        _check_schedule_args(budget, n_layers, prompt_len, window)
        n, L, B, w = int(prompt_len), int(n_layers), int(budget), int(window)
        if n <= B:
            return [n] * L
        if L == 1 or w >= B:
            return [B] * L
        targets = self.targets(B, L, n, w)
        return _apportion(targets, L * B, low=max(w, 1), high=n)

    def targets(self, budget: int, n_layers: int, prompt_len: int, window: int) -> list[Fraction]:
        """The exact real-valued per-layer budgets ``k_l + w`` before rounding (needs ``L >= 2``, ``w < B < n``)."""
        n, L, B, w = int(prompt_len), int(n_layers), int(budget), int(window)
        s = Fraction(B - w)
        k_min = s / Fraction(self.beta)
        k_max = 2 * s - k_min
        if k_max > n - w:
            k_max = Fraction(n - w)
            k_min = 2 * s - k_max
        step = (k_max - k_min) / (L - 1)
        return [w + k_max - layer * step for layer in range(L)]


def _apportion(targets: list[Fraction], total: int, low: int, high: int) -> list[int]:
    """Integers near ``targets`` (non-increasing) that sum to ``total``, non-increasing, each in [low, high].

    Start from the floors and hand the missing units, one at a time, to the layer with the largest
    remainder among those that can grow without breaking the order (the first layer of a run of equal
    values) — the largest-remainder method under a monotonicity constraint. A surplus (only when ``low``
    lifted a floor) is taken back symmetrically.
    """
    kept = [min(max(math.floor(t), low), high) for t in targets]
    last = len(kept) - 1
    while sum(kept) < total:
        growable = [
            i for i in range(last + 1) if kept[i] < high and (i == 0 or kept[i - 1] > kept[i])
        ]
        grow = max(growable, key=lambda i: (targets[i] - kept[i], -i))
        kept[grow] += 1
    while sum(kept) > total:
        shrinkable = [
            i for i in range(last + 1) if kept[i] > low and (i == last or kept[i + 1] < kept[i])
        ]
        shrink = max(shrinkable, key=lambda i: (kept[i] - targets[i], i))
        kept[shrink] -= 1
    return kept


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_MEMORY = re.compile(r"([0-9]*\.?[0-9]+)\s*([a-z]*)")
_MEMORY_ACCEPTED = (
    "a size such as '48MiB', '2GB' or 1000000 (bytes), or a share of the full cache in (0%, 100%]"
)


@dataclass(frozen=True)
class MemoryBudget:
    """KV memory a user allows: ``nbytes`` for the whole batch, or ``fraction`` of the full fp16 cache.

    The cache turns it into a token budget once it knows the prompt and what one token costs in the chosen
    codec (:meth:`tokens_for`), so eviction and quantization meet one memory target together.
    """

    nbytes: int | None = None
    fraction: float | None = None

    def tokens_for(
        self,
        prompt_len: int,
        batch: int,
        layers: int,
        token_bytes: float,
        fp16_token_bytes: float,
        fixed_bytes: int = 0,
    ) -> int:
        """Average tokens per layer for one of ``batch`` rows so that the batch's cache fits.

        ``token_bytes``: one token of one layer as stored (all KV heads, keys and values, side information);
        ``fp16_token_bytes``: the same in the uncompressed fp16 cache; ``fixed_bytes``: what the cache holds
        whatever it keeps (codebooks, row lengths). At least one token is kept, at most the prompt.
        """
        if self.nbytes is not None:
            allowed = (self.nbytes - fixed_bytes) / batch
        else:
            allowed = self.fraction * prompt_len * layers * fp16_token_bytes
        return max(1, min(prompt_len, int(allowed // (layers * token_bytes))))


def parse_memory(spec: str | int | MemoryBudget) -> MemoryBudget:
    """``"48MiB"`` / ``"2GB"`` / ``1000000`` -> bytes; ``"5%"`` -> a fraction of the full fp16 cache."""
    if isinstance(spec, MemoryBudget):
        return spec
    error = PyramidKVError(f"kv_memory: got {spec!r}; expected {_MEMORY_ACCEPTED}")
    if isinstance(spec, bool):
        raise error
    if isinstance(spec, Integral):
        if spec < 1:
            raise error
        return MemoryBudget(nbytes=int(spec))
    if not isinstance(spec, str):
        raise error
    text = spec.strip().lower()
    if text.endswith("%"):
        number = _as_float(text[:-1].strip(), spec)
        if not 0 < number <= 100:
            raise error
        return MemoryBudget(fraction=number / 100)
    match = _MEMORY.fullmatch(text)
    if not match or match.group(2) not in _UNITS:
        raise error
    nbytes = int(float(match.group(1)) * _UNITS[match.group(2)])
    if nbytes < 1:
        raise error
    return MemoryBudget(nbytes=nbytes)
