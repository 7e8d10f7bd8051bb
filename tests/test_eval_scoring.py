"""Scorers on hand-made answers: exact match of the needle value, RULER's all / part string matches."""

from __future__ import annotations

import pytest

from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.scoring import score


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("12345", 1.0),
        ("The pass key is 12345.", 1.0),
        ("12345\nI hope this helps", 1.0),
        ("1234", 0.0),
        ("123456", 0.0),
        ("54321, 12345", 0.0),
        ("The pass key is twelve thousand.", 0.0),
        ("", 0.0),
    ],
)
def test_exact_match_reads_the_first_number(answer, expected):
    assert score("exact", answer, ["12345"]) == expected


def test_string_match_all_is_the_share_found_case_insensitively():
    refs = ["alpha", "Beta", "7654321", "f47ac10b-58cc-4372-a567-0e02b2c3d479"]
    assert score("all", "ALPHA beta 7654321 F47AC10B-58CC-4372-A567-0E02B2C3D479", refs) == 1.0
    assert score("all", "alpha and 7654321", refs) == 0.5
    assert score("all", "alpha", refs) == 0.25
    assert score("all", "nothing here", refs) == 0.0


def test_string_match_part_needs_one():
    assert score("part", "it is beta", ["alpha", "beta"]) == 1.0
    assert score("part", "gamma", ["alpha", "beta"]) == 0.0


def test_bad_scorer_or_no_reference_names_the_parameter():
    with pytest.raises(PyramidKVError, match="scorer"):
        score("fuzzy", "x", ["x"])
    with pytest.raises(PyramidKVError, match="expected"):
        score("all", "x", [])
