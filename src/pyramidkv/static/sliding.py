"""A sliding-window layer of a static cache: a ring of ``sliding_window`` slots, for the CUDA-graph path of models
that mix sliding-window and full-attention layers (Gemma 3, Qwen2 with sliding layers).

The eager cache keeps a sliding layer's last ``sliding_window - 1`` tokens whole
(:class:`~pyramidkv.cache.sliding.SlidingLayer`) and lets the model's sliding mask choose what a query sees.
Here the window is a ring: new token ``r`` goes to slot ``(held + r) mod sliding_window`` (a device counter, so a
captured step writes where the replay is), overwriting the token that just left the window, and a slot is
visible once written. A query thus attends to exactly the last ``sliding_window`` tokens, itself included, as
the model's sliding mask allows; keys carry their rotary positions, so their order in the ring does not matter.
The layer reuses :class:`~pyramidkv.static.buffers.StaticBufferLayer`'s buffers, mask and attention; only the
slot of a new token wraps. Rows of a batch share the window's length: batches of one, or of prompts of one
length.
"""

from __future__ import annotations

import torch

from pyramidkv.cache import hook
from pyramidkv.errors import PyramidKVError
from pyramidkv.static.buffers import StaticBufferLayer


class StaticSlidingLayer(StaticBufferLayer):
    """A static sliding-window layer: the window in a ring of ``sliding_window`` slots (module docstring)."""

    def __init__(
        self, layer_idx: int, keys, values, seen: int, sliding_window: int, max_new_tokens: int
    ):
        """``keys``/``values`` (batch, kv_heads, held, dim): the window the source holds (held <= sliding_window
        - 1), ``seen`` tokens of the sequence so far."""
        held = keys.shape[-2]
        if held >= sliding_window:
            raise PyramidKVError(
                f"source: layer {layer_idx} holds {held} tokens of a {sliding_window}-token sliding window"
            )
        super().__init__(layer_idx, keys, values, None, seen, sliding_window - held)
        # the ring wraps: new tokens are bounded by max_new_tokens, not by its slots
        self.max_new_tokens = max_new_tokens
        self.ring = sliding_window
        # slots past the ring are never visible, however many tokens pass through it
        beyond = torch.arange(self.capacity, device=self.device) >= sliding_window
        self.order.masked_fill_(beyond, torch.iinfo(self.order.dtype).max)
        self.window = (keys.clone(), values.clone())  # the ring as built, for rewind(0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new token at its ring slot; its mask: every written slot."""
        if key_states.shape[-2] != 1:
            raise PyramidKVError(
                f"key_states: got {key_states.shape[-2]} tokens; a static sliding-window layer takes one per step"
            )
        self._reserve(1)
        index = (self.filled + self.width).remainder(self.ring).view(1)
        self.keys.index_copy_(2, index, key_states)
        self.values.index_copy_(2, index, value_states)
        self.mask = self.order <= self.filled
        self.step.add_(1)
        self.filled.add_(1)
        hook.announce(self)
        return self.keys, self.values

    def rewind(self, appended: int) -> None:
        """Back to ``appended`` new tokens: to the build (0) always, later only while no token has wrapped."""
        if appended and self.width + self.appended > self.ring:
            raise PyramidKVError(
                f"appended: got {appended}; the sliding window has wrapped since, so only rewind(0) restores it"
            )
        if appended == 0:
            held = self.width
            self.keys[:, :, :held], self.values[:, :, :held] = self.window
        super().rewind(appended)

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for t in self.window)
