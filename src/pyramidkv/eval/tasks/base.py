"""What a task produces: a :class:`Draft` (one prompt and its answers) and the :class:`Sample` the runner
evaluates (a draft in one mode).

Modes, as the KV-compression literature uses both:

* ``query-aware`` — the whole prompt, question included, is prefilled and compressed; the observation window
  of SnapKV / PyramidKV sees the question (the setting of both papers);
* ``context-only`` — the context is prefilled and compressed alone; the question is appended after it,
  uncompressed, before decoding (kvpress's default, closer to a cache reused across questions).

Both modes see exactly the same tokens: ``context_ids + question_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.tasks.layout import Prompt

MODES = ("query-aware", "context-only")
MODE_CHOICES = (*MODES, "both")
SCORERS = ("exact", "all", "part", "longbench")
_SHORT = {"query-aware": "qa", "context-only": "co"}


@dataclass
class Draft:
    """One generated prompt with its expected answers, before a mode is chosen."""

    prompt: Prompt
    answers: list[str]
    scorer: str = "exact"
    max_new_tokens: int = 16
    depth: float | None = None
    metadata: dict = field(default_factory=dict)


@dataclass
class Sample:
    """One prompt in one mode, ready for the runner.

    ``depth`` is the nominal needle depth for tasks laid out on a depth grid (needle, passkey), else None;
    ``metadata`` holds what else the task recorded (measured depths, keys, haystack kind, ...).
    """

    id: str
    task: str
    mode: str
    context_ids: list[int]
    question_ids: list[int]
    answers: list[str]
    scorer: str = "exact"
    max_new_tokens: int = 16
    length: int = 0
    depth: float | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PyramidKVError(f"mode: got {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.scorer not in SCORERS:
            raise PyramidKVError(
                f"scorer: got {self.scorer!r}; expected one of {', '.join(SCORERS)}"
            )
        if not self.context_ids or not self.question_ids:
            raise PyramidKVError(f"sample {self.id}: context and question must both hold tokens")
        if not self.answers:
            raise PyramidKVError(f"sample {self.id}: no expected answer")
        if self.max_new_tokens < 1:
            raise PyramidKVError(f"max_new_tokens: got {self.max_new_tokens}; expected >= 1")

    @property
    def prompt_ids(self) -> list[int]:
        """The whole prompt, chat template included."""
        return self.context_ids + self.question_ids

    @property
    def prefill_ids(self) -> torch.Tensor:
        """(1, n) ids prefilled and compressed in this sample's mode."""
        ids = self.prompt_ids if self.mode == "query-aware" else self.context_ids
        return torch.tensor([ids], dtype=torch.long)

    @property
    def append_ids(self) -> torch.Tensor | None:
        """(1, m) question ids appended after compression (context-only mode), else None."""
        if self.mode == "query-aware":
            return None
        return torch.tensor([self.question_ids], dtype=torch.long)


def samples_of(draft: Draft, task: str, length: int, index: int, modes: tuple[str, ...]):
    """The draft as one :class:`Sample` per mode; ids read ``task-length-index-mode``."""
    for mode in modes:
        yield Sample(
            id=f"{task}-{length}-{index:04d}-{_SHORT[mode]}",
            task=task,
            mode=mode,
            context_ids=list(draft.prompt.context_ids),
            question_ids=list(draft.prompt.question_ids),
            answers=list(draft.answers),
            scorer=draft.scorer,
            max_new_tokens=draft.max_new_tokens,
            length=length,
            depth=draft.depth,
            metadata=dict(draft.metadata),
        )
