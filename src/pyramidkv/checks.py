"""The one family of input checks: each names the parameter, the value given and what is accepted.

Every check raises :class:`~pyramidkv.errors.PyramidKVError` (a ``ValueError``), so the command line prints
it as one line and a caller catching ``ValueError`` still catches it. Messages read
``name: got value; expected ...``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from numbers import Integral, Real

from pyramidkv.errors import PyramidKVError


def _accepted(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    if low is not None:
        return f">= {low}"
    return f"<= {high}" if high is not None else ""


def check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (either bound may be open), else an error naming ``name``.

    Bools are refused: ``True`` is an ``int`` to Python but never a count to a user.
    """
    whole = isinstance(value, Integral) and not isinstance(value, bool)
    if not whole or (low is not None and value < low) or (high is not None and value > high):
        raise PyramidKVError(
            f"{name}: got {value!r}; expected an integer {_accepted(low, high)}".rstrip()
        )
    return int(value)


def check_number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``), else an error."""
    number = isinstance(value, Real) and not isinstance(value, bool)
    if (
        not number
        or not math.isfinite(value)
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and value > high)
    ):
        accepted = _accepted(low, high)
        if low_open and low is not None:
            accepted = f"> {low}" if high is None else f"in ({low}, {high}]"
        raise PyramidKVError(f"{name}: got {value!r}; expected a finite number {accepted}".rstrip())
    return float(value)


def check_choice(name: str, value: object, choices: Collection) -> object:
    """``value`` unless it is not one of ``choices``."""
    if value not in choices:
        raise PyramidKVError(
            f"{name}: got {value!r}; expected one of {', '.join(map(str, choices))}"
        )
    return value
