"""One layer of a static cache without codes: preallocated key and value buffers read under a device-side mask.

The buffers hold the source's kept prompt tokens (row (b, h) valid up to its own kept length, as in
:class:`~pyramidkv.cache.compressed.CompressedCache`) and any tokens it appended after the prompt, in slots
``[0, width)``, then room for ``max_new_tokens`` new tokens; the capacity is rounded up to a multiple of the
layer's decode chunk (:mod:`.split_attention`). A step counter held as a device tensor places new token ``r``
at slot ``width + r`` (``index_copy_``), and the mask is computed on the device as ``order <= step``, where
``order`` (built once) is -1 for a held slot, ``r`` for new-token slot ``r`` and a number beyond any step for
the kept slots a shorter row does not use. Nothing the host decides changes between steps, so a decode step
can be captured as a CUDA graph (:mod:`pyramidkv.static.cache`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyramidkv.cache import hook
from pyramidkv.cache.protocol import ModelAttention, decode_backends
from pyramidkv.static import split_attention
from pyramidkv.static.base import StaticLayerBase


class StaticBufferLayer(StaticLayerBase):
    """One layer's static buffers: kept tokens, then new tokens at a device-side position (module docstring)."""

    def __init__(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        visible: torch.Tensor | None,
        seen: int,
        max_new_tokens: int,
    ):
        """``keys``/``values`` (batch, kv_heads, width, head_dim) held so far, ``visible`` (batch, kv_heads,
        width) bool which of their slots a row attends (``None``: all), ``seen`` tokens of the sequence so far
        (positions continue from it)."""
        super().__init__(layer_idx, seen, max_new_tokens)
        batch, kv_heads, width, head_dim = keys.shape
        self.chunk = split_attention._chunk(width + max_new_tokens, batch * kv_heads)
        capacity = -(-(width + max_new_tokens) // self.chunk) * self.chunk
        self.device, self.dtype, self.width = keys.device, keys.dtype, width
        self.batch, self.capacity = batch, capacity
        self.keys = keys.new_zeros(batch, kv_heads, capacity, head_dim)
        self.values = values.new_zeros(batch, kv_heads, capacity, head_dim)
        self.keys[:, :, :width] = keys
        self.values[:, :, :width] = values
        slots = torch.arange(capacity, device=self.device)
        # the new-token index of each slot, -1 for a held one; a row's unused kept slots are never visible
        order = torch.where(slots < width, -1, slots - width)
        if visible is not None and not bool(visible.all()):
            hidden = F.pad(~visible.to(self.device), (0, capacity - width))
            self.order = torch.where(hidden, capacity, order).unsqueeze(2)
        else:
            self.order = order.view(1, 1, 1, capacity)
        self.step = torch.zeros((), dtype=torch.long, device=self.device)
        self.mask: torch.Tensor | None = None  # visible slots of the queries being decoded

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``q_len`` new tokens at slots ``width + step ...`` and compute their mask, on the device."""
        q_len = key_states.shape[-2]
        self._reserve(q_len)
        if q_len == 1:
            index, limit = (self.step + self.width).view(1), self.step
        else:
            offsets = torch.arange(q_len, device=self.device)
            index, limit = self.step + self.width + offsets, (self.step + offsets)[:, None]
        self.keys.index_copy_(2, index, key_states)
        self.values.index_copy_(2, index, value_states)
        self.mask = self.order <= limit  # (1 or batch, 1 or kv_heads, q_len, capacity)
        self.step.add_(q_len)
        hook.announce(self)
        return self.keys, self.values

    def attend(
        self, query: torch.Tensor, scaling: float, model_attention: ModelAttention | None = None
    ) -> torch.Tensor:
        """Attention of (batch, q_heads, q_len, dim) queries over the buffers under the mask of the last
        :meth:`update`; (batch, q_len, q_heads, dim) out (:func:`pyramidkv.static.split_attention.attend`; the model's own attention is not needed)."""
        return split_attention.attend(
            query, self.keys, self.values, self.mask, scaling, self.chunk, decode_backends
        )

    def rewind(self, appended: int) -> None:
        """Forget the new tokens after the first ``appended`` (their slots are masked, then overwritten)."""
        self.step.fill_(appended)
        self._recount(appended)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.order))
