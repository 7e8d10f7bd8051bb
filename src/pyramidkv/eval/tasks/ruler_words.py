"""RULER's tracing and aggregation subtasks (Hsieh et al. 2024, arXiv 2404.06654, Sec. 3):

* ``vt`` (variable tracking) — a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (four hops) scattered in the
  filler haystack; the model names every variable that holds the value.
* ``cwe`` (common words extraction) — a numbered list where ten words appear many times and the others a
  few times; the model names the ten common ones.
* ``fwe`` (frequent words extraction) — a stream of words drawn from a Zipf law (exponent 2); the model names
  the three most frequent.

Words come from the corpus word list (:func:`~pyramidkv.eval.tasks.haystacks.words`). Each list is drawn with
its own seeded generator, so the prompt for ``k`` items is fixed and :func:`fit` can bisect on ``k``.
"""

from __future__ import annotations

import random
import string
from collections import Counter
from itertools import accumulate

from pyramidkv.eval.tasks.base import Draft
from pyramidkv.eval.tasks.haystacks import pool, words
from pyramidkv.eval.tasks.layout import Layout, encode, fit

HOPS = 4
COMMON_WORDS = 10
ZIPF_EXPONENT = 2.0


def vt(tokenizer, length: int, index: int, rng: random.Random) -> Draft:
    """Variable tracking: one chain of ``HOPS`` hops from a 5-digit value, in the filler haystack."""
    value = str(rng.randint(10_000, 99_999))
    names: list[str] = []
    while len(names) < HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    statements = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))
    ]
    depths = sorted(round(rng.random(), 4) for _ in statements)
    hay = pool(tokenizer, "filler", length, 0)
    question = f"Find all variables that are assigned the value {value} in the text above. Answer with the variable names only."
    preamble = "Variable assignments are hidden in the text below. Remember them; a question about them follows the text."

    def layout(words_kept: int) -> Layout:
        return Layout(
            hay.text(words_kept), question, preamble, list(zip(depths, statements, strict=True))
        )

    prompt, _ = fit(tokenizer, layout, length, hay.size)
    return Draft(
        prompt=prompt,
        answers=names,
        scorer="all",
        max_new_tokens=48,
        metadata={"depths": depths, "depths_measured": [round(d, 4) for d in prompt.depths()]},
    )


def cwe(tokenizer, length: int, index: int, rng: random.Random) -> Draft:
    """Common words: ten words ``freq`` times each among words seen at most three times."""
    vocabulary = list(words())
    rng.shuffle(vocabulary)
    common, rare = vocabulary[:COMMON_WORDS], vocabulary[COMMON_WORDS:]
    per_item = (
        len(encode(tokenizer, "\n".join(f"{i}. {w}" for i, w in enumerate(rare[:50])), False)) / 50
    )
    items = max(length / per_item, 1)
    freq = int(
        min(30, max(4, items // 30))
    )  # RULER: 30 at long lengths; fewer where the list is short
    rare_freq = max(1, min(3, freq // 2))
    order_seed = rng.randrange(2**31)
    question = f"What are the {COMMON_WORDS} most common words in the list above? Answer with the words only."
    preamble = "Below is a numbered list of words. Some words appear many times; find the most common ones."

    def layout(k: int) -> Layout:
        entries = common * freq + rare[:k] * rare_freq
        random.Random(order_seed).shuffle(entries)
        return Layout("\n".join(f"{i + 1}. {w}" for i, w in enumerate(entries)), question, preamble)

    prompt, _ = fit(tokenizer, layout, length, len(rare))
    return Draft(
        prompt=prompt,
        answers=common,
        scorer="all",
        max_new_tokens=64,
        metadata={"common_frequency": freq, "rare_frequency": rare_freq},
    )


def _zipf_stream(vocabulary: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` words drawn with P(rank r) ~ r^-2, and the three most frequent; ties at the third place are
    broken by turning one occurrence of the fourth word into the third, so the answer is unique."""
    cumulative = list(accumulate(r**-ZIPF_EXPONENT for r in range(1, len(vocabulary) + 1)))
    stream = random.Random(seed).choices(vocabulary, cum_weights=cumulative, k=n)
    while True:  # each fix raises the sum of squared counts, so this ends
        counts = Counter(stream)
        first = {w: i for i, w in reversed(list(enumerate(stream)))}
        ranked = sorted(counts, key=lambda w: (-counts[w], first[w]))
        if len(ranked) <= 3 or counts[ranked[2]] > counts[ranked[3]]:
            return stream, ranked[:3]
        stream[stream.index(ranked[3])] = ranked[2]


def fwe(tokenizer, length: int, index: int, rng: random.Random) -> Draft:
    """Frequent words: a Zipf stream over 500 corpus words; the three most frequent are the answer."""
    vocabulary = rng.sample(words(), min(500, len(words())))
    seed = rng.randrange(2**31)
    question = "What are the 3 most frequent words in the text above? Answer with the words only."
    preamble = (
        "Below is a text of words drawn at random. Find the three words that appear most often."
    )

    def layout(n: int) -> Layout:
        return Layout(" ".join(_zipf_stream(vocabulary, n, seed)[0]), question, preamble)

    upper = max(length, 8)  # every word is at least one token
    prompt, n = fit(tokenizer, layout, length, upper)
    return Draft(
        prompt=prompt,
        answers=_zipf_stream(vocabulary, n, seed)[1],
        scorer="all",
        max_new_tokens=24,
        metadata={"words": n},
    )
