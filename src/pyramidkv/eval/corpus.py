"""Real human-written English text that every machine has: the Python Language Reference.

CPython ships the reference's prose in ``pydoc_data.topics`` (written by the Python documentation authors,
PSF License 2.0). Needle and RULER-style haystacks are built from its prose paragraphs, with code listings
and grammar rules left out, so models see natural text rather than filler. The text differs slightly between
Python versions; :func:`source` names the version so results record where their text came from.
"""

from __future__ import annotations

import random
import re
import sys
from functools import cache

_HEADING_RULE = re.compile(r"^[*=\-~^\"]{3,}$")


def source() -> str:
    """A one-line description of the text source, recorded in results."""
    version = ".".join(map(str, sys.version_info[:3]))
    return f"pydoc_data.topics of CPython {version} (Python Language Reference, PSF License 2.0)"


def _is_prose(block: str) -> bool:
    lines = block.splitlines()
    if any(
        line.startswith((" ", "\t")) for line in lines
    ):  # code listings and grammar are indented
        return False
    if any(_HEADING_RULE.match(line.strip()) for line in lines):
        return False
    words = block.split()
    return len(words) >= 12 and sum(w.isalpha() for w in words) / len(words) > 0.6


@cache
def paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of the reference, in a fixed order, each joined onto one line."""
    from pydoc_data.topics import topics

    found: list[str] = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            if _is_prose(block):
                found.append(" ".join(block.split()))
    return tuple(found)


def shuffled_paragraphs(seed: int) -> list[str]:
    """All prose paragraphs in an order fixed by ``seed``."""
    order = list(paragraphs())
    random.Random(seed).shuffle(order)
    return order
