"""Budgets as the user states them: tokens per layer (``128``), a share of the prompt (``"10%"``), or bytes of
KV memory (``"48MiB"``, ``"5%"`` of the fp16 cache).

A token budget is the *average* number of prompt tokens each layer keeps, the observation window included;
how it is spread over layers is a schedule's job (:mod:`pyramidkv.policies.schedules`). Every parse error
names ``budget`` (or ``kv_memory``), the value and what is accepted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real

from pyramidkv.checks import check_int
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
        check_int("prompt_len", prompt_len, 1)
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


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tb": 10**12,
    "tib": 2**40,
}
_MEMORY = re.compile(r"([0-9]*\.?[0-9]+)\s*([a-z]*)")
_MEMORY_ACCEPTED = (
    "a size in bytes with an optional unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB; e.g. '48MiB', '2GB', "
    "1000000), or a share of the full cache in (0%, 100%]"
)


@dataclass(frozen=True)
class MemoryBudget:
    """KV memory a user allows: ``nbytes`` for the whole batch, or ``fraction`` of the full cache.

    The full cache is the uncompressed cache of the prompt in the model's own dtype: what the model would hold
    without pyramidkv (float32 on a CPU, bf16 on a GPU by default). The cache turns the allowance into a token
    budget once it knows the prompt and what one token costs in the chosen codec (:meth:`tokens_for`), so
    eviction and quantization meet one memory target together, every byte it holds counted.
    """

    nbytes: int | None = None
    fraction: float | None = None

    def tokens_for(
        self,
        prompt_len: int,
        batch: int,
        layers: int,
        token_bytes: float,
        full_token_bytes: float,
        fixed_bytes: int = 0,
        whole_bytes: float = 0,
    ) -> int:
        """Average tokens per layer for one of ``batch`` rows (of ``prompt_len`` real tokens) so that the
        batch's cache fits: at most the prompt.

        ``token_bytes``: one token of one layer as stored (all KV heads, keys and values, side information);
        ``full_token_bytes``: the same in the uncompressed cache; ``fixed_bytes``: what the whole batch's cache
        holds whatever it keeps (codebooks, row lengths), charged to the rows equally; ``whole_bytes``: what
        one row holds uncompressed beside the ``layers`` compressed ones (the windows of sliding-window
        layers), in the full cache and the compressed one alike. Raises when not even one token per layer
        fits, saying the smallest cache the configuration can hold.
        """
        full = prompt_len * layers * full_token_bytes + whole_bytes  # one row's uncompressed cache
        if self.nbytes is not None:
            allowed = (self.nbytes - fixed_bytes) / batch - whole_bytes
        else:
            allowed = self.fraction * full - fixed_bytes / batch - whole_bytes
        tokens = int(allowed // (layers * token_bytes))
        if tokens < 1:
            asked = (
                f"{self.nbytes:,} bytes"
                if self.nbytes is not None
                else f"{self.fraction:.4%} of the full cache ({self.fraction * full * batch:,.0f} bytes)"
            )
            smallest = math.ceil(batch * (layers * token_bytes + whole_bytes) + fixed_bytes)
            kept_whole = (
                f", {batch * whole_bytes:,.0f} bytes of sliding windows kept whole"
                if whole_bytes
                else ""
            )
            raise PyramidKVError(
                f"kv_memory: {asked} is less than the smallest cache this configuration holds: "
                f"{smallest:,} bytes (one token per layer and row, {fixed_bytes:,} bytes of row lengths, key "
                f"shifts and codebooks{kept_whole}), {smallest - (allowed * batch + whole_bytes * batch + fixed_bytes):,.0f} "
                "bytes short"
            )
        return min(prompt_len, tokens)


def parse_memory(spec: str | int | MemoryBudget) -> MemoryBudget:
    """``"48MiB"`` / ``"2GB"`` / ``1000000`` -> bytes; ``"5%"`` -> a fraction of the full cache."""
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
