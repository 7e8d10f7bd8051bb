"""Budgets: parsing user input, and per-layer schedules against a float64 re-derivation of PyramidKV."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyramidkv.budgets import Budget, parse_budget
from pyramidkv.policies.schedules import PyramidSchedule, UniformSchedule

# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (128, Budget(tokens=128)),
        ("128", Budget(tokens=128)),
        (" 64 ", Budget(tokens=64)),
        (np.int64(7), Budget(tokens=7)),
        ("10%", Budget(fraction=0.10)),
        ("12.5 %", Budget(fraction=0.125)),
        ("100%", Budget(fraction=1.0)),
        (0.25, Budget(fraction=0.25)),
        ("0.25", Budget(fraction=0.25)),
        (1.0, Budget(fraction=1.0)),
        (Budget(tokens=3), Budget(tokens=3)),
    ],
)
def test_parse_budget_accepts(spec, expected):
    assert parse_budget(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        0,
        -5,
        "0",
        "-3",
        "0%",
        "-10%",
        "150%",
        "abc",
        "",
        float("nan"),
        float("inf"),
        "nan",
        "inf%",
        1.5,
        128.0,
        "128.0",
        0.0,
        True,
        None,
        [10],
        "48MiB",
        "10%%",
    ],
)
def test_parse_budget_rejects_with_a_clear_message(spec):
    with pytest.raises(ValueError, match="budget") as info:
        parse_budget(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert "expected" in message and "%" in message


def test_budget_needs_exactly_one_field():
    with pytest.raises(ValueError, match="exactly one"):
        Budget()
    with pytest.raises(ValueError, match="exactly one"):
        Budget(tokens=4, fraction=0.5)


@pytest.mark.parametrize("percent", [1, 3, 10, 25, 33, 50, 99, 100])
def test_fraction_rounds_up_exactly(percent):
    budget = parse_budget(f"{percent}%")
    for n in range(1, 400):
        assert budget.tokens_for(n) == max(1, (percent * n + 99) // 100)  # integer ceil


def test_float_fraction_is_taken_at_its_decimal_value():
    assert Budget(fraction=0.1).tokens_for(30) == 3  # 0.1 * 30 is 3.0000000000000004 in floats
    assert Budget(fraction=0.3).tokens_for(10) == 3
    assert Budget(fraction=0.01).tokens_for(1) == 1


def test_token_budget_is_clamped_to_the_prompt():
    assert Budget(tokens=128).tokens_for(1000) == 128
    assert Budget(tokens=128).tokens_for(100) == 100
    with pytest.raises(ValueError, match="prompt_len"):
        Budget(tokens=128).tokens_for(0)


@pytest.mark.parametrize("spec", ["10%", "128", "0.5%"])
def test_str_round_trips(spec):
    assert parse_budget(str(parse_budget(spec))) == parse_budget(spec)


# -------------------------------------------------------------------------------------------- schedules


def pyramid_reference(B: int, L: int, n: int, w: int, beta: float) -> list[float]:
    """Per-layer budgets k_l + w straight from the PyramidKV formula, float64."""
    s = B - w
    k_min = s / beta
    k_max = 2 * s - k_min
    if k_max > n - w:
        k_max = n - w
        k_min = 2 * s - k_max
    return [w + k_max - layer * (k_max - k_min) / (L - 1) for layer in range(L)]


def check_pyramid(B: int, L: int, n: int, w: int, beta: float) -> str:
    """Assert every promise of PyramidSchedule for one input; return the regime it fell in."""
    got = PyramidSchedule(beta=beta).layer_budgets(B, L, n, w)
    assert len(got) == L and all(isinstance(b, int) for b in got)
    if n <= B:
        assert got == [n] * L
        return "no compression"
    if L == 1 or w >= B:
        assert got == [B] * L
        return "uniform"
    targets = pyramid_reference(B, L, n, w, beta)
    assert sum(got) == L * B
    assert all(a >= b for a, b in pairwise(got))
    assert all(max(w, 1) <= b <= n for b in got)
    for b, t in zip(got, targets, strict=True):
        assert math.floor(t - 1e-9) <= b <= math.ceil(t + 1e-9), (got, targets)
    clamped = 2 * (B - w) - (B - w) / beta > n - w
    if clamped:
        assert got[0] == n  # the bottom layer keeps the whole prompt
    return "clamped" if clamped else "pyramid"


def test_pyramid_matches_the_formula_over_a_grid():
    regimes = set()
    for L in (1, 2, 3, 7, 24, 32):
        for B in (1, 8, 9, 16, 100, 128):
            for n in (1, 5, 37, 64, 129, 200, 255, 1000, 5000):
                for w in (0, 1, 8):
                    for beta in (1, 2, 20, 33.3):
                        regimes.add(check_pyramid(B, L, n, w, beta))
    assert regimes == {"no compression", "uniform", "clamped", "pyramid"}


def test_pyramid_known_case():
    # B=128, w=8, beta=20, L=2, n=1000: k_min = 6, k_max = 234 -> layers keep 242 and 14.
    assert PyramidSchedule().layer_budgets(128, 2, 1000, 8) == [242, 14]


def test_pyramid_spreads_rounding_without_breaking_order():
    # Targets with small steps and fractional parts: floors alone would lose tokens.
    for L in (5, 13, 40):
        got = PyramidSchedule(beta=1.5).layer_budgets(11, L, 500, 8)
        assert sum(got) == 11 * L and all(a >= b for a, b in pairwise(got))


@settings(max_examples=200, deadline=None)
@given(
    B=st.integers(1, 300),
    L=st.integers(1, 48),
    n=st.integers(1, 3000),
    w=st.integers(0, 40),
    beta=st.floats(1, 100),
)
def test_pyramid_properties_hold_for_random_inputs(B, L, n, w, beta):
    check_pyramid(B, L, n, w, beta)


def test_uniform_schedule():
    assert UniformSchedule().layer_budgets(16, 4, 100, 8) == [16] * 4
    assert UniformSchedule().layer_budgets(16, 3, 10, 8) == [10] * 3


@pytest.mark.parametrize("beta", [0, 0.5, -1, float("nan"), float("inf"), True, "20"])
def test_pyramid_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        PyramidSchedule(beta=beta)


@pytest.mark.parametrize("schedule", [UniformSchedule(), PyramidSchedule()])
@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((0, 4, 10, 2), "budget"),
        ((4, 0, 10, 2), "n_layers"),
        ((4, 4, 0, 2), "prompt_len"),
        ((4, 4, 10, -1), "window"),
        ((4.0, 4, 10, 2), "budget"),
    ],
)
def test_schedules_reject_bad_arguments(schedule, args, name):
    with pytest.raises(ValueError, match=name):
        schedule.layer_budgets(*args)
