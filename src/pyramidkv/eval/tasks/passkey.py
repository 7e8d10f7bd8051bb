"""``passkey``: recall a 5-digit key hidden in a repeated-filler haystack (Mohtashami & Jaggi 2023).

The layout is the one measured to work on the embedded model with the full cache: the key is stated twice
in one insert, the question closes the user turn and asks for the number only (100% at 1k, 2k and 4k
tokens in the filler haystack on the H200, 40 samples per cell). Samples cycle over :data:`DEPTHS`.
"""

from __future__ import annotations

import random

from pyramidkv.eval.tasks.base import Draft
from pyramidkv.eval.tasks.haystacks import pool
from pyramidkv.eval.tasks.layout import Layout, fit

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PREAMBLE = "A pass key is hidden in the text below. Find it and remember it."
QUESTION = "What is the pass key? Answer with the number only."


def passkey_draft(
    tokenizer, length: int, rng: random.Random, depth: float, haystack: str, text: str | None = None
) -> Draft:
    """A passkey prompt of about ``length`` tokens with the key at ``depth`` of a ``haystack`` kind, or of the
    user's ``text`` when given."""
    value = str(rng.randint(10_000, 99_999))
    needle = f"The pass key is {value}. Remember it: the pass key is {value}."
    hay = pool(tokenizer, haystack, length, rng.randrange(2**31), text)
    haystack = haystack if text is None else "file"

    def layout(words: int) -> Layout:
        return Layout(hay.text(words), QUESTION, PREAMBLE, [(depth, needle)])

    prompt, _ = fit(tokenizer, layout, length, hay.size)
    return Draft(
        prompt=prompt,
        answers=[value],
        scorer="exact",
        max_new_tokens=12,
        depth=depth,
        metadata={"haystack": haystack, "depth_measured": round(prompt.depths()[0], 4)},
    )


def draft(tokenizer, length: int, index: int, rng: random.Random, text: str | None = None) -> Draft:
    return passkey_draft(tokenizer, length, rng, DEPTHS[index % len(DEPTHS)], "filler", text)
