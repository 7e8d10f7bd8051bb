"""A KV cache of static shape, so that a decode step can be captured once as a CUDA graph and replayed.

Why: on the H200 a decode step of the embedded 30-layer model costs ~18 ms with the full cache and 26-30 ms
with PyramidKV at batch 1, about what it costs at batch 128: the step is bound by the host (Python and a few
microseconds per kernel launch), not by memory (issue 7). A CUDA graph replays the kernels of one captured
step without the host, but only when nothing the host decided can change between steps: no tensor shape, no
Python number baked into a kernel's arguments. :class:`~pyramidkv.cache.compressed.CompressedCache` grows its recent
window by ``torch.cat`` (a new shape at every step) and counts tokens on the host. This cache does not:

* per layer one preallocated (batch, kv_heads, capacity, head_dim) key buffer and one value buffer (the
  shapes of transformers' caches): the source's kept prompt tokens (row (b, h) valid up to its own kept
  length, as in CompressedCache) and any tokens it appended after the prompt, in slots ``[0, width)``, then
  room for ``max_new_tokens`` new tokens; capacity = width + ``max_new_tokens`` rounded up to a multiple of
  the layer's decode chunk (:mod:`pyramidkv.static.split_attention`), a power of two >= 16 (the alignment the memory-efficient SDPA kernel
  wants of a mask row; it pads a copy otherwise) that is 16 or at most 1/32 of the slots, so little is wasted;
* a step counter held as a device tensor: new token ``r`` is written at slot ``width + r`` by
  ``index_copy_``, and the mask is computed on the device as ``order <= step``, where ``order`` (built once)
  is -1 for a held slot, ``r`` for new-token slot ``r`` and a number beyond any step for the kept slots a
  shorter row does not use;
* positions of new tokens from the same counter (:meth:`StaticCompressedCache.position_ids`).

Each layer has its own buffer, so PyramidKV's per-layer budgets give per-layer capacities. Attention goes
through pyramidkv's registered attention function, which hands the query to :meth:`StaticLayer.attend`: the
attention over the buffers, with its mask, in :mod:`pyramidkv.static.split_attention` (batched matmuls split over
the slots, flash-decoding style, for the few query rows of a decode step).

A source with FibQuant or TurboQuant codes gets :class:`~pyramidkv.static.coded.StaticCodedLayer`
layers instead: a static store of codes and a ring of fp16 recent tokens (:mod:`pyramidkv.static.coded`).

The host also counts steps, to refuse one past ``max_new_tokens`` with a ``ValueError``; a replayed graph
runs no Python, so whoever replays it counts the replays.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from pyramidkv.cache import hook as attention
from pyramidkv.cache.accounting import kv_geometry
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.codecs.rotated import RotatedBlockCodec
from pyramidkv.kernels import check_kernel, use_fused
from pyramidkv.static import coded as static_codes
from pyramidkv.static import split_attention as static_attention
from pyramidkv.static.base import StaticLayerBase


def _check_count(name: str, value, low: int, high: int | None = None) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an integer in [low, high]."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or value < low or (high is not None and value > high):
        accepted = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: got {value!r}; expected an integer {accepted}")


class StaticLayer(StaticLayerBase):
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
        self.chunk = static_attention._chunk(width + max_new_tokens, batch * kv_heads)
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
        attention.announce(self)
        return self.keys, self.values

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of (batch, q_heads, q_len, dim) queries over the buffers under the mask of the last
        :meth:`update`; (batch, q_len, q_heads, dim) out (:func:`pyramidkv.static.split_attention.attend`)."""
        return static_attention.attend(
            query, self.keys, self.values, self.mask, scaling, self.chunk, attention.decode_backends
        )

    def rewind(self, appended: int) -> None:
        """Forget the new tokens after the first ``appended`` (their slots are masked, then overwritten)."""
        self.step.fill_(appended)
        self._recount(appended)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.order))


def _held(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A compressed layer's kept tokens (trimmed to its longest row) then appended ones, and which are valid."""
    lengths = layer.lengths
    width = int(lengths.max())  # one host read per layer, at build
    slots = torch.arange(width, device=lengths.device)
    visible = slots < lengths[..., None]
    keys, values = layer.kept_keys[:, :, :width], layer.kept_values[:, :, :width]
    recent = layer.keys.shape[-2]
    if recent:  # tokens appended after the prompt (a question, decode steps): every row holds them
        keys = torch.cat([keys, layer.keys], dim=-2)
        values = torch.cat([values, layer.values], dim=-2)
        visible = F.pad(visible, (0, recent), value=True)
    return keys, values, visible


def _coded_layers(source: CompressedCache, max_new_tokens: int, kernel: str | None) -> list:
    """Static copies of a prefilled CompressedCache's coded layers; ``kernel`` as CompressedCache takes it
    (``None``: the source's choice)."""
    codecs = source.codecs
    if not all(isinstance(c, RotatedBlockCodec) for c in (codecs.keys, codecs.values)):
        raise ValueError(
            f"source: a CompressedCache with codec {codecs.label()!r}; the static cache reads "
            "FibQuant or TurboQuant codes, or none"
        )
    kernel = source.kernel if kernel is None else kernel
    fused_ok = check_kernel(kernel, codecs, source.head_dim)
    return [
        static_codes.coded_layer(
            layer, source.residual, max_new_tokens, use_fused(kernel, fused_ok, layer.device)
        )
        for layer in source.layers
    ]


def _source_layers(source, layers: int, max_new_tokens: int, kernel: str | None) -> list:
    """Static layers copied from a prefilled CompressedCache or DynamicCache (the class docstring)."""
    if not isinstance(source, Cache):
        raise TypeError(
            f"source: got {type(source).__name__}; expected a prefilled CompressedCache or a prefilled "
            "DynamicCache"
        )
    if len(source.layers) != layers:
        raise ValueError(f"source: {len(source.layers)} layers; the model has {layers}")
    if not isinstance(source, CompressedCache):
        for index, layer in enumerate(source.layers):
            if type(layer) is not DynamicLayer or not layer.get_seq_length():
                raise ValueError(
                    f"source: layer {index} is an empty or non-dynamic {type(layer).__name__}; expected "
                    "a DynamicCache that has prefilled the prompt"
                )
        return [
            StaticLayer(i, layer.keys, layer.values, None, layer.get_seq_length(), max_new_tokens)
            for i, layer in enumerate(source.layers)
        ]
    for layer in source.layers:
        if not layer.compressed:
            raise ValueError(
                f"source: layer {layer.layer_idx} holds no prefilled prompt; run the prompt through "
                "the model with this cache first"
            )
    if source.codecs is not None:
        return _coded_layers(source, max_new_tokens, kernel)
    return [
        StaticLayer(i, *_held(layer), layer.seen, max_new_tokens)
        for i, layer in enumerate(source.layers)
    ]


class StaticCompressedCache(Cache):
    """A static-shape copy of a prefilled cache with room for ``max_new_tokens``: for CUDA-graph decoding.

    ``StaticCompressedCache(model, source, max_new_tokens=64)`` — ``source`` is a prefilled
    :class:`~pyramidkv.cache.compressed.CompressedCache` (the tokens its eviction policy kept; with a FibQuant or
    TurboQuant codec, as codes and an fp16 window: :mod:`pyramidkv.static.coded`, one token per step) or a
    prefilled transformers ``DynamicCache`` (every token: the full-cache baseline, decoded through the very
    same code). ``source`` is only read. ``kernel`` (codes only: ``"auto"``, ``"torch"`` or ``"triton"``
    as CompressedCache takes it; default the source's) chooses the attention over the codes. Pass the
    static cache to a forward call like any cache, or decode with :class:`DecodeStep`, whose inputs and
    outputs stay at fixed addresses. A step past ``max_new_tokens`` raises ``ValueError``; :meth:`rewind`
    goes back to an earlier step (with codes: to the start).
    """

    def __init__(self, model, source, max_new_tokens: int, kernel: str | None = None):
        _check_count("max_new_tokens", max_new_tokens, 1)
        layers, _, _ = kv_geometry(model.config)
        # normal tensors (not inference tensors), so decoding may run under no_grad or inference_mode
        with torch.inference_mode(False), torch.no_grad():
            built = _source_layers(source, layers, max_new_tokens, kernel)
        attention.install(model)
        self._release = weakref.finalize(self, attention.release, weakref.ref(model))
        self.max_new_tokens = max_new_tokens
        super().__init__(layers=built)

    @property
    def appended(self) -> int:
        """New tokens decoded since the cache was built (or rewound)."""
        return self.layers[0].appended

    def position_ids(self, q_len: int = 1) -> torch.Tensor:
        """(1, q_len) positions of the next ``q_len`` tokens, computed on the device from the step counter."""
        first = self.layers[0]
        positions = first.step + first.start
        if q_len == 1:
            return positions.view(1, 1)
        return (positions + torch.arange(q_len, device=first.device)).view(1, q_len)

    def rewind(self, appended: int = 0) -> None:
        """Go back to the state after the first ``appended`` new tokens (0: the state the cache was built in)."""
        _check_count("appended", appended, 0, self.appended)
        for layer in self.layers:
            layer.rewind(appended)

    def nbytes(self) -> int:
        """Bytes of the preallocated buffers (all slots, used or not) and the visibility orders."""
        return sum(layer.nbytes() for layer in self.layers)

    def close(self) -> None:
        """Restore the model's own attention implementation (idempotent)."""
        self._release()

    def __enter__(self) -> StaticCompressedCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DecodeStep:
    """One greedy decode step over a :class:`StaticCompressedCache`, its input in a buffer of fixed address.

    Copy the tokens to feed into :attr:`input_ids` (batch, 1), call the step: it returns the next-token
    logits (batch, vocab) and the greedy tokens (batch, 1). Nothing the host computes changes between calls
    (positions come from the cache's device counter), so the call can be captured once as a CUDA graph and
    replayed, its outputs read from the tensors the captured call returned.
    """

    def __init__(self, model, cache: StaticCompressedCache):
        self.model, self.cache = model, cache
        batch = cache.layers[0].batch
        with torch.inference_mode(False):  # a normal tensor: copied into under any grad mode
            self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=cache.layers[0].device)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(
            input_ids=self.input_ids,
            position_ids=self.cache.position_ids(),
            **cache_kwargs(self.model, self.cache),
        )
        logits = out.logits[:, -1]
        return logits, logits.argmax(dim=-1, keepdim=True)
