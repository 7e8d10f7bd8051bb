"""One layer of a static cache without codes: preallocated key and value buffers read under a device-side mask.

The buffers hold the source's kept prompt tokens (row (b, h) valid up to its own kept length, as in
:class:`~pyramidkv.cache.compressed.CompressedCache`) and any tokens it appended after the prompt, in slots
``[0, width)``, then room for ``max_new_tokens`` new tokens; the capacity is rounded up to a multiple of the
layer's decode chunk (:mod:`.split_attention`). A step counter held as a device tensor places new token ``r``
at slot ``width + r`` (``index_copy_``), and the mask is computed on the device as ``order <= step``, where
``order`` (built once) is -1 for a held slot, ``r`` for new-token slot ``r`` and a number beyond any step for
the kept slots a shorter row does not use. Nothing the host decides changes between steps, so a decode step
can be captured as a CUDA graph (:mod:`pyramidkv.static.cache`).

Under a decode budget (:mod:`.decoding`) the new tokens go to slot ``width + filled``, where ``filled`` (a second
device counter) restarts at 0 each time the layer selects again between two replays, ``width`` covers the
layer's largest share of the budget and there are only ``compress_every`` slots after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyramidkv.cache import hook
from pyramidkv.cache.protocol import ModelAttention, decode_backends
from pyramidkv.errors import PyramidKVError
from pyramidkv.static import split_attention
from pyramidkv.static.base import StaticLayerBase
from pyramidkv.static.decoding import StaticDecodeBudget


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
        budget: StaticDecodeBudget | None = None,
    ):
        """``keys``/``values`` (batch, kv_heads, held, head_dim) held so far, ``visible`` (batch, kv_heads,
        held) bool which of their slots a row attends (``None``: all), ``seen`` tokens of the sequence so far
        (positions continue from it); ``budget``: the layer's share of a decode budget (module docstring)."""
        super().__init__(layer_idx, seen, max_new_tokens)
        batch, kv_heads, held, head_dim = keys.shape
        self.budget = budget
        width = held if budget is None else budget.width(held, seen + max_new_tokens)
        room = max_new_tokens if budget is None else budget.every
        self.chunk = split_attention._chunk(width + room, batch * kv_heads)
        capacity = -(-(width + room) // self.chunk) * self.chunk
        self.device, self.dtype, self.width = keys.device, keys.dtype, width
        self.batch, self.capacity = batch, capacity
        self.kept_width = held  # slots [0, kept_width) hold the kept tokens, the longest row's
        self.keys = keys.new_zeros(batch, kv_heads, capacity, head_dim)
        self.values = values.new_zeros(batch, kv_heads, capacity, head_dim)
        self.keys[:, :, :held] = keys
        self.values[:, :, :held] = values
        slots = torch.arange(capacity, device=self.device)
        # the new-token index of each slot, -1 for a held one; unused kept slots are never visible
        order = torch.where(slots < held, -1, torch.where(slots < width, capacity, slots - width))
        if visible is not None and not bool(visible.all()):
            hidden = F.pad(~visible.to(self.device), (0, capacity - held))
            self.order = torch.where(hidden, capacity, order).unsqueeze(2)
        else:
            self.order = order.view(1, 1, 1, capacity)
        if budget is not None:  # rewritten in place by every compaction: one order per row and head
            self.order = self.order.expand(batch, kv_heads, 1, capacity).clone()
        self.step = torch.zeros((), dtype=torch.long, device=self.device)
        # new-token slots in use: the step's slot, reset to 0 by a decode budget's compaction
        self.filled = torch.zeros((), dtype=torch.long, device=self.device)
        self.compacted = False
        self.mask: torch.Tensor | None = None  # visible slots of the queries being decoded

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``q_len`` new tokens at slots ``width + filled ...`` and compute their mask, on the device."""
        q_len = key_states.shape[-2]
        if self.budget is not None:
            self.budget.reserve(q_len)
        self._reserve(q_len)
        if q_len == 1:
            index, limit = (self.filled + self.width).view(1), self.filled
        else:
            offsets = torch.arange(q_len, device=self.device)
            index, limit = self.filled + self.width + offsets, (self.filled + offsets)[:, None]
        self.keys.index_copy_(2, index, key_states)
        self.values.index_copy_(2, index, value_states)
        self.mask = self.order <= limit  # (1 or batch, 1 or kv_heads, q_len, capacity)
        self.step.add_(q_len)
        self.filled.add_(q_len)
        hook.announce(self)
        return self.keys, self.values

    def attend(
        self, query: torch.Tensor, scaling: float, model_attention: ModelAttention | None = None
    ) -> torch.Tensor:
        """Attention of (batch, q_heads, q_len, dim) queries over the buffers under the mask of the last
        :meth:`update`; (batch, q_len, q_heads, dim) out (:func:`pyramidkv.static.split_attention.attend`; the model's own attention is not needed)."""
        if self.budget is not None:
            self.budget.remember(query, self.filled, scaling)
        return split_attention.attend(
            query, self.keys, self.values, self.mask, scaling, self.chunk, decode_backends
        )

    def candidates(self, since: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What a decode budget's compaction scores, in the eager cache's order and layout: the kept slots,
        then the ``since`` tokens of the interval. Returns their keys, which hold a token (batch, n), and the
        buffer slots they sit in (for :meth:`keep`)."""
        slots = torch.cat(
            [
                torch.arange(self.kept_width, device=self.device),
                torch.arange(self.width, self.width + since, device=self.device),
            ]
        )
        # per candidate: -1 held, r new token r, beyond any count hidden; every KV head of a row holds as many
        order = self.order[:, :, 0].index_select(-1, slots)
        valid = (order < self.filled)[:, 0]
        return self.keys.index_select(2, slots), valid, slots

    def keep(self, indices: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor) -> None:
        """Hold only the candidates at ``indices`` (batch, kv_heads, K) of the buffer ``slots`` they sit in,
        row (b, h) up to ``lengths[b, h]``, in slots ``[0, K)``, and free the new-token slots: in place, so a
        captured graph goes on reading the same tensors
        (:meth:`~pyramidkv.static.decoding.StaticDecodeBudget.compact`)."""
        indices = slots[indices]
        width = indices.shape[-1]
        if width > self.width:
            raise PyramidKVError(f"indices: {width} kept slots; the layer holds {self.width}")
        gather = indices.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        kept_keys, kept_values = self.keys.gather(2, gather), self.values.gather(2, gather)
        self.keys[:, :, :width] = kept_keys
        self.values[:, :, :width] = kept_values
        every = torch.arange(self.capacity, device=self.device)
        kept = every < lengths.to(self.device)[..., None]
        order = torch.where(
            kept, -1, torch.where(every < self.width, self.capacity, every - self.width)
        )
        self.order.copy_(order.unsqueeze(2))
        self.filled.zero_()
        self.kept_width, self.compacted = width, True

    def rewind(self, appended: int) -> None:
        """Forget the new tokens after the first ``appended`` (their slots are masked, then overwritten)."""
        if self.compacted:
            raise PyramidKVError(
                "appended: a static cache that selected again under its decode budget cannot rewind (the "
                "tokens it evicted are gone)"
            )
        if self.budget is not None:
            self.budget.since = appended
        self.step.fill_(appended)
        self.filled.fill_(appended)
        self._recount(appended)

    def nbytes(self) -> int:
        ring = getattr(
            self.budget, "queries", None
        )  # a decode budget's ring of queries, once allocated
        tensors = (self.keys, self.values, self.order, *([] if ring is None else [ring]))
        return sum(t.numel() * t.element_size() for t in tensors)
