"""Haystacks and word lists, all from real text (:mod:`pyramidkv.eval.corpus`) or RULER's filler.

Two haystack kinds, as in RULER (Hsieh et al. 2024, arXiv 2404.06654):

* ``prose`` — paragraphs of the Python Language Reference in a seeded order (our stand-in for RULER's Paul
  Graham essays: real human-written English);
* ``filler`` — RULER's "noise" haystack, the same five short sentences repeated (also the classic passkey
  haystack, Mohtashami & Jaggi 2023);

and a user's own text (``pyramidkv eval needle|passkey --haystack FILE``): its paragraphs in order, from a
seeded starting paragraph, repeated when the text is shorter than the prompt.

A :class:`Pool` is a long enough stretch of either, cut at a word count by :meth:`Pool.text` so
:func:`~pyramidkv.eval.tasks.layout.fit` can bisect on the number of words.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache

from pyramidkv.errors import PyramidKVError
from pyramidkv.eval import corpus
from pyramidkv.eval.tasks.layout import encode

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("prose", "filler")


@dataclass(frozen=True)
class Pool:
    """Haystack text that can be cut after any number of words; ``size`` is how many words it holds."""

    source: str
    word_ends: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.word_ends)

    def text(self, words: int) -> str:
        """The first ``words`` words, paragraph breaks kept."""
        return self.source[: self.word_ends[words - 1]] if words > 0 else ""


def _pool(source: str) -> Pool:
    return Pool(source, tuple(m.end() for m in re.finditer(r"\S+", source)))


def pool(tokenizer, kind: str, tokens: int, seed: int, text: str | None = None) -> Pool:
    """At least ``tokens`` tokens of haystack ``kind`` (``prose`` in the order of ``seed``, or ``filler``), or
    of ``text`` when given (its paragraphs in order from one chosen by ``seed``)."""
    if text is not None:
        return _cycled(tokenizer, paragraphs_of(text), tokens, seed)
    if kind == "filler":
        once = len(encode(tokenizer, FILLER + " ", first=False))
        return _pool(" ".join([FILLER] * (tokens // max(once, 1) + 2)))
    if kind != "prose":
        raise PyramidKVError(f"haystack: got {kind!r}; expected one of {', '.join(HAYSTACKS)}")
    return _cycled(tokenizer, corpus.shuffled_paragraphs(seed), tokens, 0)


def paragraphs_of(text: str) -> list[str]:
    """A text's paragraphs (blank-line separated, whitespace inside each collapsed), empty ones dropped."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _cycled(tokenizer, paragraphs: list[str], tokens: int, start: int) -> Pool:
    """``paragraphs`` from index ``start`` (modulo their number), cycling, until they hold ``tokens`` tokens."""
    kept, total = [], 0
    while total < tokens:
        paragraph = paragraphs[(start + len(kept)) % len(paragraphs)]
        kept.append(paragraph)
        total += len(encode(tokenizer, paragraph, first=False)) + 1
    return _pool("\n\n".join(kept))


@cache
def words() -> tuple[str, ...]:
    """Distinct lower-case words of 4 to 10 letters in the corpus, sorted: keys and word-task vocabulary."""
    found = set()
    for paragraph in corpus.paragraphs():
        found.update(re.findall(r"(?<![\w.])[a-z]{4,10}(?![\w.])", paragraph))
    return tuple(sorted(found))


def key(rng: random.Random) -> str:
    """A two-word key such as ``operand-lexical`` (RULER's keys are word pairs too)."""
    first, second = rng.sample(words(), 2)
    return f"{first}-{second}"
