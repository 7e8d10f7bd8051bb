"""Scorers: how an answer is compared with the expected strings. Each returns a score in [0, 1].

* ``exact`` — needle and passkey: the first number in the answer must equal the hidden value exactly
  ("The pass key is 12345." scores 1; "1234", "123456" or "54321, 12345" score 0). Looking only at the
  first number keeps a model from scoring by listing many candidates.
* ``all`` — RULER's ``string_match_all`` (Hsieh et al. 2024): the share of expected strings found in the
  answer, case-insensitively (3 of 4 values found scores 0.75).
* ``part`` — RULER's ``string_match_part``: 1 when any expected string is found.

A sample counts as correct when its score is 1.
"""

from __future__ import annotations

import re

from pyramidkv.errors import PyramidKVError

_NUMBER = re.compile(r"\d+")


def exact_match(answer: str, expected: list[str]) -> float:
    """1.0 when the first run of digits in ``answer`` is one of ``expected``, else 0.0."""
    found = _NUMBER.search(answer)
    return float(found is not None and found.group() in expected)


def string_match_all(answer: str, expected: list[str]) -> float:
    """Share of ``expected`` strings that occur in ``answer`` (case-insensitive)."""
    text = answer.lower()
    return sum(ref.lower() in text for ref in expected) / len(expected)


def string_match_part(answer: str, expected: list[str]) -> float:
    """1.0 when any of ``expected`` occurs in ``answer`` (case-insensitive), else 0.0."""
    text = answer.lower()
    return float(any(ref.lower() in text for ref in expected))


SCORERS = {"exact": exact_match, "all": string_match_all, "part": string_match_part}


def score(scorer: str, answer: str, expected: list[str], metadata: dict | None = None) -> float:
    """Score ``answer`` with the scorer named ``scorer`` (see the module docstring)."""
    if scorer == "longbench":  # LongBench's metric of the sample's dataset (longbench_metrics.py)
        from pyramidkv.eval.longbench_metrics import score_answer

        meta = metadata or {}
        return score_answer(
            meta.get("dataset", ""), answer, list(expected), meta.get("all_classes")
        )
    if scorer not in SCORERS:
        raise PyramidKVError(f"scorer: got {scorer!r}; expected one of {', '.join(SCORERS)}")
    if not expected:
        raise PyramidKVError("expected: no expected answer to score against")
    return SCORERS[scorer](answer, list(expected))
