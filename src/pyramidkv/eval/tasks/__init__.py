"""Evaluation tasks, generated offline and seeded: ``needle``, ``passkey`` and the RULER-style ``ruler:*``.

``make_samples("needle", tokenizer, 2000, n=20, seed=0, mode="both")`` gives 20 prompts of about 2,000
tokens of the tokenizer's model (chat template included), each in both modes. ``ruler`` names the group of
all :data:`~pyramidkv.eval.tasks.ruler.SUBTASKS`, ``n`` samples each.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from pyramidkv.checks import check_int
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.tasks import needle, passkey, ruler
from pyramidkv.eval.tasks.base import MODE_CHOICES, MODES, SCORERS, Draft, Sample, samples_of

TASKS: dict[str, Callable[..., Draft]] = {
    "needle": needle.draft,
    "passkey": passkey.draft,
    **{f"ruler:{name}": build for name, build in ruler.SUBTASKS.items()},
}
GROUPS: dict[str, tuple[str, ...]] = {"ruler": tuple(n for n in TASKS if n.startswith("ruler:"))}
OWN_HAYSTACK = ("needle", "passkey")  # the tasks whose haystack may be the user's text (--haystack)


def task_names(task: str) -> tuple[str, ...]:
    """The tasks ``task`` stands for: itself, or every member of a group such as ``ruler``."""
    if task.startswith("longbench:"):  # a LongBench jsonl file: longbench:PATH
        return (task,)
    if task in GROUPS:
        return GROUPS[task]
    if task in TASKS:
        return (task,)
    known = ", ".join([*TASKS, *GROUPS])
    raise PyramidKVError(f"task: got {task!r}; expected one of {known}")


def check_haystack_task(task: str) -> None:
    """Refuse a haystack file for a task that builds its own prompts."""
    if task not in OWN_HAYSTACK:
        raise PyramidKVError(
            f"--haystack: task {task!r} builds its own prompts; a haystack file serves "
            f"{' and '.join(OWN_HAYSTACK)}"
        )


def _modes(mode: str) -> tuple[str, ...]:
    if mode not in MODE_CHOICES:
        raise PyramidKVError(f"mode: got {mode!r}; expected one of {', '.join(MODE_CHOICES)}")
    return MODES if mode == "both" else (mode,)


def make_samples(
    task: str,
    tokenizer,
    length: int,
    n: int,
    seed: int = 0,
    mode: str = "query-aware",
    haystack: str | None = None,
) -> list[Sample]:
    """``n`` samples of ``task`` (per member, for a group) of about ``length`` tokens, in ``mode``;
    ``haystack``: the user's text to hide the needle in (needle and passkey only).

    Sample ``i`` of a task depends only on ``(seed, task, length, i)`` (and the haystack text): asking for
    more samples keeps the first ones, and both modes of one index share the same tokens.
    """
    if haystack is not None:
        check_haystack_task(task)
    if task.startswith(
        "longbench:"
    ):  # ``length`` caps the prompt; the first ``n`` records of the file
        from pyramidkv.eval.longbench import longbench_samples

        return longbench_samples(task.removeprefix("longbench:"), tokenizer, length, n, mode)
    names = task_names(task)
    modes = _modes(mode)
    check_int("samples", n, 1)
    check_int("length", length, 1)
    found: list[Sample] = []
    for name in names:
        for index in range(n):
            rng = random.Random(f"{seed}:{name}:{length}:{index}")
            own = {} if haystack is None else {"text": haystack}
            draft = TASKS[name](tokenizer, length, index, rng, **own)
            found.extend(samples_of(draft, name, length, index, modes))
    return found


__all__ = [
    "GROUPS",
    "MODES",
    "MODE_CHOICES",
    "SCORERS",
    "TASKS",
    "Draft",
    "Sample",
    "make_samples",
    "task_names",
]
