"""Prompt layout: a haystack with facts inserted at token depths, a question at the end, a target length.

Every task writes one user turn: ``preamble``, the haystack with its inserts, then the question, wrapped in the
model's chat template when it has one. Lengths and depths are counted in the model's own tokens:

* :func:`fit` finds, by bisection, the largest haystack (in words or items) whose whole prompt, template
  included, is at most the target length, so prompts land within a token or two of it.
* :func:`build` places each insert at the sentence start (or, if none is within 1% of the haystack, the
  word start) whose token offset in the haystack is nearest ``depth * haystack tokens`` — the placement of
  the needle-in-a-haystack test (Kamradt 2023) and of PyramidKV's heatmaps (Cai et al. 2024, Fig. 6).

The whole prompt is tokenized once, as ``apply_chat_template`` would, and cut at the token where the
question starts: ``context_ids`` is a prefix of the full prompt ``context_ids + question_ids``, so the
query-aware mode (question inside the compressed prompt) and the context-only mode (context compressed
alone, question appended) see the same tokens.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from pyramidkv.errors import PyramidKVError

_SENTENCE_START = re.compile(r"(?:(?<=[.!?:] )|(?<=\n))(?=\S)")
_WORD_START = re.compile(r"(?<=\s)(?=\S)")
SNAP_TOLERANCE = 0.01  # a sentence start may stand in for the exact depth within 1% of the haystack


@dataclass
class Layout:
    """The text of one prompt before tokenization; ``inserts`` are ``(depth, text)`` with depth in [0, 1]."""

    haystack: str
    question: str
    preamble: str = ""
    inserts: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise PyramidKVError("question: the task's question is empty")
        for depth, _ in self.inserts:
            if not 0.0 <= depth <= 1.0:
                raise PyramidKVError(f"depth: got {depth!r}; expected a number in [0, 1]")


@dataclass
class Prompt:
    """A tokenized prompt: ``context_ids + question_ids`` is the whole chat-templated prompt.

    ``insert_spans`` are the ``[start, end)`` token positions of each insert in the whole prompt (in the
    order of ``Layout.inserts``), ``haystack_span`` the positions of the haystack with its inserts.
    """

    text: str
    context_ids: list[int]
    question_ids: list[int]
    insert_spans: list[tuple[int, int]]
    haystack_span: tuple[int, int]

    @property
    def n_tokens(self) -> int:
        return len(self.context_ids) + len(self.question_ids)

    def depths(self) -> list[float]:
        """Where each insert landed: haystack tokens before it over all haystack tokens, inserts left out."""
        start, end = self.haystack_span
        inserted = sum(b - a for a, b in self.insert_spans)
        total = max(end - start - inserted, 1)
        found = []
        for a, _ in self.insert_spans:
            before = sum(b2 - a2 for a2, b2 in self.insert_spans if b2 <= a)
            found.append((a - start - before) / total)
        return found


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode(tokenizer, text: str, first: bool = True) -> list[int]:
    """Token ids of ``text``; ``first`` marks the start of a prompt, which gets the tokenizer's special
    tokens when there is no chat template (a rendered template already holds its own)."""
    add = first and not has_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def _render(tokenizer, body: str) -> tuple[str, int]:
    """The prompt text of one user turn holding ``body``, and where ``body`` starts in it."""
    if not has_template(tokenizer):
        return body, 0
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
    )
    start = text.find(body)
    if start < 0:
        raise PyramidKVError(
            "tokenizer: the chat template rewrites the message text, so the question cannot be located; "
            "use a model whose template copies the user message verbatim"
        )
    return text, start


def _tokens_before(tokenizer, text: str, end: int, first: bool = True) -> int:
    """Tokens of ``text[:end]`` with trailing whitespace left to what follows (BPE joins a space to the next
    word), so the count is the position of the token that starts there in the whole text, within a token."""
    return len(encode(tokenizer, text[:end].rstrip(), first))


def _nearest(tokenizer, text: str, starts: list[int], target: float) -> tuple[int, int]:
    """The start in ``starts`` (sorted char offsets) whose token offset is nearest ``target``, and that offset."""
    lo, hi = 0, len(starts) - 1
    while lo < hi:  # the first start at or after the target; token offsets grow with char offsets
        mid = (lo + hi) // 2
        if _tokens_before(tokenizer, text, starts[mid], first=False) < target:
            lo = mid + 1
        else:
            hi = mid
    best = None
    for i in (lo - 1, lo):
        if 0 <= i < len(starts):
            tokens = _tokens_before(tokenizer, text, starts[i], first=False)
            if best is None or abs(tokens - target) < abs(best[1] - target):
                best = (starts[i], tokens)
    return best


def place(tokenizer, haystack: str, depth: float) -> int:
    """The char offset in ``haystack`` at which an insert lands ``depth`` of the way through its tokens."""
    total = len(encode(tokenizer, haystack, first=False))
    target = depth * total
    sentences = [0, *(m.start() for m in _SENTENCE_START.finditer(haystack)), len(haystack)]
    where, tokens = _nearest(tokenizer, haystack, sorted(set(sentences)), target)
    if abs(tokens - target) > max(1.0, SNAP_TOLERANCE * total):
        words = [0, *(m.start() for m in _WORD_START.finditer(haystack)), len(haystack)]
        where, _ = _nearest(tokenizer, haystack, sorted(set(words)), target)
    return where


def _body(layout: Layout, offsets: list[int]) -> tuple[str, list[tuple[int, int]], tuple[int, int]]:
    """The user message, the char spans of the inserts in it, and the char span of the haystack."""
    head = f"{layout.preamble}\n\n" if layout.preamble else ""
    pieces, spans, cursor, position = [head], [None] * len(offsets), 0, len(head)
    hay = layout.haystack
    for i in sorted(range(len(offsets)), key=lambda j: (offsets[j], layout.inserts[j][0])):
        at = offsets[i]
        pieces.append(hay[cursor:at])
        position += at - cursor
        cursor = at
        text = layout.inserts[i][1]
        lead = " " if at == len(hay) and at > 0 else ""
        tail = " " if at < len(hay) else ""
        pieces.append(lead + text + tail)
        spans[i] = (position + len(lead), position + len(lead) + len(text))
        position += len(lead) + len(text) + len(tail)
    pieces.append(hay[cursor:])
    position += len(hay) - cursor
    pieces.append(f"\n\n{layout.question}")
    return "".join(pieces), spans, (len(head), position)


class _Tokens:
    """The natural tokenization of a whole prompt text, and the token at which a char offset falls.

    With a fast tokenizer, offsets say which token covers which characters, so the prompt is tokenized
    once, as ``apply_chat_template`` would, and cut at token boundaries. A tokenizer without offsets
    tokenizes the two sides of a cut apart, and positions are counted by tokenizing prefixes.
    """

    def __init__(self, tokenizer, text: str):
        self.tokenizer, self.text = tokenizer, text
        try:
            encoded = tokenizer(
                text, add_special_tokens=not has_template(tokenizer), return_offsets_mapping=True
            )
            self.ids = list(encoded["input_ids"])
            self.ends: list[int] | None = [end for _, end in encoded["offset_mapping"]]
        except (NotImplementedError, TypeError, KeyError):
            self.ends = None

    def index(self, char: int) -> int:
        """Position of the first token that ends after ``char``."""
        if self.ends is None:
            return _tokens_before(self.tokenizer, self.text, char)
        return bisect_right(self.ends, char)

    def split(self, char: int) -> tuple[list[int], list[int]]:
        """Ids before and from the token at ``char``; their concatenation is the whole prompt."""
        if self.ends is None:
            return encode(self.tokenizer, self.text[:char]), encode(
                self.tokenizer, self.text[char:], first=False
            )
        cut = self.index(char)
        return self.ids[:cut], self.ids[cut:]


def build(tokenizer, layout: Layout) -> Prompt:
    """Tokenize ``layout`` with inserts at their token depths (see the module docstring)."""
    offsets = [place(tokenizer, layout.haystack, depth) for depth, _ in layout.inserts]
    body, spans, hay = _body(layout, offsets)
    text, base = _render(tokenizer, body)
    tokens = _Tokens(tokenizer, text)
    context_ids, question_ids = tokens.split(base + len(body) - len(layout.question))
    return Prompt(
        text=text,
        context_ids=context_ids,
        question_ids=question_ids,
        insert_spans=[(tokens.index(base + a), tokens.index(base + b)) for a, b in spans],
        haystack_span=(tokens.index(base + hay[0]), tokens.index(base + hay[1])),
    )


def count(tokenizer, layout: Layout) -> int:
    """Tokens of the whole prompt, inserts placed by characters (cheap; :func:`build` places by tokens)."""
    offsets = [_snap_to_word(layout.haystack, depth) for depth, _ in layout.inserts]
    body, _, _ = _body(layout, offsets)
    return len(encode(tokenizer, _render(tokenizer, body)[0], first=True))


def _snap_to_word(text: str, depth: float) -> int:
    at = round(depth * len(text))
    if at >= len(text):
        return len(text)
    starts = [0, *(m.start() for m in _WORD_START.finditer(text))]
    return starts[max(bisect_left(starts, at) - 1, 0)]


def fit(
    tokenizer, layout_for: Callable[[int], Layout], target: int, upper: int
) -> tuple[Prompt, int]:
    """The prompt of ``layout_for(k)`` and ``k``, for the largest ``k`` in [0, upper] whose prompt has at most
    ``target`` tokens (``k`` counts haystack words or list items; more never makes the prompt shorter)."""
    fixed = count(tokenizer, layout_for(0))
    if fixed > target:
        raise PyramidKVError(
            f"length: {target} tokens is shorter than this task's fixed text ({fixed} tokens "
            "with the chat template); ask for a longer length"
        )
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(tokenizer, layout_for(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    while True:  # placing inserts by tokens can move the count by a token or two: step back if over
        prompt = build(tokenizer, layout_for(lo))
        if prompt.n_tokens <= target or lo == 0:
            return prompt, lo
        lo -= 1
