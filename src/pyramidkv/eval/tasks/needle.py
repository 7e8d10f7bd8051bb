"""``needle``: the needle-in-a-haystack test (Kamradt 2023) on real prose, on an 11-point depth grid.

A 5-digit pass key, stated twice, is inserted at depth 0%, 10%, ..., 100% of a haystack of Python Language
Reference paragraphs; the question closes the user turn. Scored by exact match of the key. The runner's
report draws the length x depth heatmap of the PyramidKV paper (Cai et al. 2024, Fig. 6). On the embedded
model with the full cache this layout scored 95%, 93% and 70% at 1k, 2k and 4k tokens (H200, 40 samples
per cell): room both ways for methods to differ.
"""

from __future__ import annotations

import random

from pyramidkv.eval.tasks.base import Draft
from pyramidkv.eval.tasks.passkey import passkey_draft

DEPTHS = tuple(i / 10 for i in range(11))


def draft(tokenizer, length: int, index: int, rng: random.Random, text: str | None = None) -> Draft:
    return passkey_draft(tokenizer, length, rng, DEPTHS[index % len(DEPTHS)], "prose", text)
