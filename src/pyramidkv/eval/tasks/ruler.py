"""``ruler``: RULER-style synthetic tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?", arXiv 2404.06654), generated offline from our own haystacks.

=================  =========  ======  =====================================================================
subtask            haystack   value   what is asked
=================  =========  ======  =====================================================================
niah_single_1      filler     number  the value of the one key hidden in the text
niah_single_2      prose      number  the same, in real prose
niah_single_3      prose      uuid    the same, with a UUID as the value
niah_multikey      prose      number  one key's value among four keys (three distractors)
niah_multivalue    prose      number  all four values stated for one key
niah_multiquery    prose      number  the values of four keys, asked together
vt                 filler     names   every variable bound, through a chain of four hops, to a value
cwe                list       words   the 10 most common words of a numbered word list
fwe                words      words   the 3 most frequent words of a Zipf-distributed word stream
=================  =========  ======  =====================================================================

RULER's parameters where it has them (7-digit values, four keys / values / queries, four hops, ten common
words, Zipf exponent 2); scored with RULER's ``string_match_all``: the share of expected strings found in
the answer. Needles go at random depths; their measured depths are kept in the metadata.
"""

from __future__ import annotations

import random
import uuid
from functools import partial

from pyramidkv.eval.tasks.base import Draft
from pyramidkv.eval.tasks.haystacks import key, pool
from pyramidkv.eval.tasks.layout import Layout, fit
from pyramidkv.eval.tasks.ruler_words import cwe, fwe, vt

ECHO_TOKENS = 24  # room for the question restated before the answer


def _value(rng: random.Random, kind: str) -> str:
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randint(1_000_000, 9_999_999))


def _question(noun: str, asked: list[str], values: int) -> str:
    if len(asked) > 1:
        names = f"{', '.join(asked[:-1])} and {asked[-1]}"
        return f"What are the special magic {noun}s for {names} mentioned in the text above? Answer with the {noun}s only."
    if values > 1:
        return f"What are all the special magic {noun}s for {asked[0]} mentioned in the text above? Answer with the {noun}s only."
    return f"What is the special magic {noun} for {asked[0]} mentioned in the text above? Answer with the {noun} only."


def niah(
    tokenizer,
    length: int,
    index: int,
    rng: random.Random,
    *,
    haystack: str,
    kind: str = "number",
    keys: int = 1,
    values: int = 1,
    queries: int = 1,
) -> Draft:
    """RULER's needle-in-a-haystack family: ``keys`` keys with ``values`` values each; ``queries`` keys asked."""
    names: list[str] = []
    while len(names) < keys:
        name = key(rng)
        if name not in names:
            names.append(name)
    facts = {name: [_value(rng, kind) for _ in range(values)] for name in names}
    noun = "number" if kind == "number" else "UUID"
    needles = [
        f"One of the special magic {noun}s for {name} is {v}."
        if values > 1
        else f"The special magic {noun} for {name} is {v}."
        for name, vs in facts.items()
        for v in vs
    ]
    rng.shuffle(needles)
    depths = sorted(round(rng.random(), 4) for _ in needles)
    asked = names[:queries]
    hay = pool(tokenizer, haystack, length, rng.randrange(2**31))
    preamble = f"Some special magic {noun}s are hidden in the text below. Remember them; a question about them follows the text."

    def layout(words: int) -> Layout:
        return Layout(
            hay.text(words),
            _question(noun, asked, values),
            preamble,
            list(zip(depths, needles, strict=True)),
        )

    prompt, _ = fit(tokenizer, layout, length, hay.size)
    answers = [v for name in asked for v in facts[name]]
    # the embedded model restates the question before answering ("The special magic number for X mentioned
    # in the text is"): ~20 tokens; a 7-digit number is 7 tokens, a UUID about 30
    per_answer = 10 if kind == "number" else 36
    return Draft(
        prompt=prompt,
        answers=answers,
        scorer="all",
        max_new_tokens=per_answer * len(answers) + ECHO_TOKENS,
        metadata={
            "haystack": haystack,
            "keys": names,
            "depths": depths,
            "depths_measured": [round(d, 4) for d in prompt.depths()],
        },
    )


SUBTASKS = {
    "niah_single_1": partial(niah, haystack="filler"),
    "niah_single_2": partial(niah, haystack="prose"),
    "niah_single_3": partial(niah, haystack="prose", kind="uuid"),
    "niah_multikey": partial(niah, haystack="prose", keys=4),
    "niah_multivalue": partial(niah, haystack="prose", values=4),
    "niah_multiquery": partial(niah, haystack="prose", keys=4, queries=4),
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
}
