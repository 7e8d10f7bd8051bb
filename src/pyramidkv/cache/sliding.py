"""Sliding-window layers of a :class:`~pyramidkv.cache.compressed.CompressedCache`: kept as the model attends.

Gemma 2 and 3 (five sliding layers to one global in Gemma 3), gpt-oss and others mix layers that attend to
the last ``sliding_window`` tokens with full-attention layers. A sliding layer's cache is already bounded
by its window, and the model's own sliding mask decides what each query sees, so pyramidkv leaves it whole:
it holds the last ``sliding_window - 1`` tokens (what transformers' ``DynamicSlidingWindowLayer`` holds) and
its attention is the model's own (the hook hands over every call of a layer that did not announce itself).
Only the full-attention layers are compressed, and the budgets, byte budgets and schedules are theirs.

Unlike transformers' layer, the window kept after an update is copied out of the prompt's keys and values,
so a long prompt is not held alive behind a slice of it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer


class SlidingLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer with the reporting members of a compressed layer (module docstring)."""

    compressed = True  # nothing is waiting for a compression
    chunked = False
    batched_prefill = None
    decoding = None

    def end_chunks(self) -> None:
        """Nothing to select after a chunked prefill: the window slides."""

    def __init__(self, layer_idx: int, sliding_window: int):
        super().__init__(sliding_window=sliding_window)
        self.layer_idx = layer_idx
        self.prompt_tokens = self.prompt_bytes = 0

    @property
    def seen(self) -> int:
        return self.cumulative_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        first = not self.is_initialized
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.keys.shape[-2] < keys.shape[-2]:  # a slice of this step's states: hold a copy of it
            self.keys, self.values = self.keys.clone(), self.values.clone()
        if first:
            self.prompt_tokens, self.prompt_bytes = self.cumulative_length, self.nbytes()
        return keys, values

    def restore(self, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        """Hold ``keys``/``values`` (the window a prefill of ``seen`` tokens left), as if it had run here."""
        self.lazy_initialization(keys, values)
        self.keys, self.values, self.cumulative_length = keys, values, seen
        self.prompt_tokens, self.prompt_bytes = seen, self.nbytes()

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values) if isinstance(t, torch.Tensor)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def components(self) -> dict[str, int]:
        """The window counts as recent tokens in the model's dtype."""
        return {
            "codes": 0,
            "side": 0,
            "kept_fp": 0,
            "recent": self.nbytes(),
            "lengths": 0,
            "shift": 0,
        }

    def rates(self) -> list[dict]:
        if self.keys is None:
            return []
        tokens = [[self.keys.shape[-2]] * self.keys.shape[1]] * self.keys.shape[0]
        return [{"bits": None, "tokens": tokens, "bytes": self.nbytes()}]

    def kept_tokens(self) -> torch.Tensor:
        """(batch, kv_heads) tokens held: the window."""
        if self.keys is None:
            return torch.zeros((1, 1), dtype=torch.long)
        return torch.full(self.keys.shape[:2], self.keys.shape[-2], dtype=torch.long)

    def slots(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def stackable(self) -> bool:
        return False

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = self.prompt_tokens = self.prompt_bytes = 0
