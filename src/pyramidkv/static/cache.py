"""A KV cache of static shape, so that a decode step can be captured once as a CUDA graph and replayed.

Why: an eager decode step of a small model is bound by the host (Python and a few microseconds per kernel
launch), not by memory, at any batch (benchmarks/README.md, eager step time). A CUDA graph replays the kernels
of one captured step without the host, but only when nothing the host decided can change between steps: no
tensor shape, no Python number baked into a kernel's arguments.
:class:`~pyramidkv.cache.compressed.CompressedCache` grows its recent window by ``torch.cat`` (a new shape at
every step) and counts tokens on the host. This cache does not: each layer is a copy of the source's layer in
buffers allocated once, written and masked from a step counter held on the device —

* :class:`~pyramidkv.static.buffers.StaticBufferLayer` for tokens in the model's dtype (a DynamicCache, or a
  CompressedCache without codes), read by :mod:`pyramidkv.static.split_attention`;
* :class:`~pyramidkv.static.coded.StaticCodedLayer` for FibQuant or TurboQuant codes: a static store of codes
  and a ring of fp16 recent tokens, one token coded per step.

Positions of new tokens come from the same counter (:meth:`StaticCompressedCache.position_ids`). Each layer
has its own buffers, so PyramidKV's per-layer budgets give per-layer capacities. The host also counts steps,
to refuse one past ``max_new_tokens``; a replayed graph runs no Python, so whoever replays it counts the
replays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from pyramidkv.cache.accounting import kv_geometry, softmax_extra
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.cache.hook import HookedCache
from pyramidkv.cache.sliding import SlidingLayer
from pyramidkv.checks import check_int
from pyramidkv.codecs.rotated import RotatedBlockCodec
from pyramidkv.errors import PyramidKVError
from pyramidkv.kernels import check_kernel, use_fused
from pyramidkv.static import coded
from pyramidkv.static.buffers import StaticBufferLayer
from pyramidkv.static.decoding import StaticDecodeBudget, check_static_budget
from pyramidkv.static.sliding import StaticSlidingLayer


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
        raise PyramidKVError(
            f"source: a CompressedCache with codec {codecs.label()!r}; the static cache reads "
            "FibQuant or TurboQuant codes, or none"
        )
    kernel = source.kernel if kernel is None else kernel
    fused_ok = check_kernel(kernel, codecs, source.head_dim)
    return [
        _sliding(layer, max_new_tokens)
        if isinstance(layer, SlidingLayer)
        else coded.coded_layer(
            layer,
            source.residual,
            max_new_tokens,
            use_fused(kernel, fused_ok, layer.device),
            _budget(layer),
        )
        for layer in source.layers
    ]


def _sliding(layer: SlidingLayer, max_new_tokens: int) -> StaticSlidingLayer:
    """The static ring of a sliding-window layer's window."""
    return StaticSlidingLayer(
        layer.layer_idx, layer.keys, layer.values, layer.seen, layer.sliding_window, max_new_tokens
    )


def _check_sliding(model, source) -> None:
    """What the static path cannot do beside sliding-window layers: rows of different lengths (the ring does
    not know a row's padding), and attention that adds to the softmax (Gemma 2's soft-capping, gpt-oss's sinks),
    which the static layers' own attention does not apply."""
    if source.layers[0].keys is not None and source.layers[0].keys.shape[0] > 1:
        raise PyramidKVError(
            "source: a batch of several rows in a model with sliding-window layers; the static cache's "
            "sliding windows hold one row each: decode eagerly (cuda_graph=False) or one row at a time"
        )
    extra = softmax_extra(model)
    if extra is not None:
        raise PyramidKVError(
            f"source: {type(model).__name__} {extra}, which the static cache's attention does not apply: "
            "decode eagerly (cuda_graph=False)"
        )


def _source_layers(model, source, layers: int, max_new_tokens: int, kernel: str | None) -> list:
    """Static layers copied from a prefilled CompressedCache or DynamicCache (the class docstring)."""
    if not isinstance(source, Cache):
        raise TypeError(
            f"source: got {type(source).__name__}; expected a prefilled CompressedCache or a prefilled "
            "DynamicCache"
        )
    if len(source.layers) != layers:
        raise PyramidKVError(f"source: {len(source.layers)} layers; the model has {layers}")
    if not isinstance(source, CompressedCache):
        for index, layer in enumerate(source.layers):
            if type(layer) is not DynamicLayer or not layer.get_seq_length():
                raise PyramidKVError(
                    f"source: layer {index} is an empty or non-dynamic {type(layer).__name__}; expected "
                    "a DynamicCache that has prefilled the prompt"
                )
        return [
            StaticBufferLayer(
                i, layer.keys, layer.values, None, layer.get_seq_length(), max_new_tokens
            )
            for i, layer in enumerate(source.layers)
        ]
    if not all(source.compressed_layers):
        _check_sliding(model, source)
    if source.decode_budget is not None:
        check_static_budget(source)
    if any(getattr(layer, "pending", None) is not None for layer in source.layers):
        raise PyramidKVError(
            "source: a chunked prefill with prefill_headroom still holds more than its budget; call "
            "source.end_chunked_prefill() first"
        )
    for layer in source.layers:
        if not layer.compressed:
            raise PyramidKVError(
                f"source: layer {layer.layer_idx} holds no prefilled prompt; run the prompt through "
                "the model with this cache first"
            )
    if source.codecs is not None:
        return _coded_layers(source, max_new_tokens, kernel)
    return [
        _sliding(layer, max_new_tokens)
        if isinstance(layer, SlidingLayer)
        else StaticBufferLayer(i, *_held(layer), layer.seen, max_new_tokens, _budget(layer))
        for i, layer in enumerate(source.layers)
    ]


def _budget(layer) -> StaticDecodeBudget | None:
    """The static copy's share of the source layer's decode budget, if it has one."""
    if layer.decoding is None:
        return None
    return StaticDecodeBudget(layer.decoding, layer.rank, list(layer.real))


class StaticCompressedCache(HookedCache, Cache):
    """A static-shape copy of a prefilled cache with room for ``max_new_tokens``: for CUDA-graph decoding.

    ``StaticCompressedCache(model, source, max_new_tokens=64)`` — ``source`` is a prefilled
    :class:`~pyramidkv.cache.compressed.CompressedCache` (the tokens its eviction policy kept; with a FibQuant or
    TurboQuant codec, as codes and an fp16 window: :mod:`pyramidkv.static.coded`, one token per step) or a
    prefilled transformers ``DynamicCache`` (every token: the full-cache baseline, decoded through the very
    same code). A source with a ``decode_budget`` keeps it (with codes, when ``compress_every`` is at most
    its ``residual``): every ``compress_every`` steps, call :meth:`after_step` between two steps (the graph
    loop does). ``source`` is only read. ``kernel`` (codes only: ``"auto"``, ``"torch"`` or ``"triton"``
    as CompressedCache takes it; default the source's) chooses the attention over the codes. Pass the
    static cache to a forward call like any cache, or decode with :class:`DecodeStep`, whose inputs and
    outputs stay at fixed addresses. A step past ``max_new_tokens`` raises ``ValueError``; :meth:`rewind`
    goes back to an earlier step (with codes: to the start).
    """

    def __init__(self, model, source, max_new_tokens: int, kernel: str | None = None):
        check_int("max_new_tokens", max_new_tokens, 1)
        layers, _, _ = kv_geometry(model.config)
        # normal tensors (not inference tensors), so decoding may run under no_grad or inference_mode
        with torch.inference_mode(False), torch.no_grad():
            built = _source_layers(model, source, layers, max_new_tokens, kernel)
        self._hook(model)
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

    def after_step(self) -> None:
        """Under a decode budget, let every layer whose interval is complete select again, in place (eagerly,
        between two replays of a captured step: :mod:`pyramidkv.static.decoding`); otherwise nothing."""
        bounded = [layer for layer in self.layers if getattr(layer, "budget", None) is not None]
        if not bounded:
            return
        # one host read of the device's count: a replayed graph runs no Python to count its steps
        filled = int(bounded[0].filled)
        if filled < bounded[0].budget.every:
            return
        for layer in bounded:
            layer.budget.since = filled
            layer.budget.compact(layer)

    def rewind(self, appended: int = 0) -> None:
        """Go back to the state after the first ``appended`` new tokens (0: the state the cache was built in)."""
        check_int("appended", appended, 0, self.appended)
        for layer in self.layers:
            layer.rewind(appended)

    def nbytes(self) -> int:
        """Bytes of the preallocated buffers (all slots, used or not) and the visibility orders."""
        return sum(layer.nbytes() for layer in self.layers)


class DecodeStep:
    """One greedy decode step over a :class:`StaticCompressedCache`, its input in a buffer of fixed address.

    Copy the tokens to feed into :attr:`input_ids` (batch, 1), call the step: it returns the next-token
    logits (batch, vocab) and the greedy tokens (batch, 1), the argmax of the logits plus :attr:`bias` (vocab,),
    zero unless tokens are to be suppressed (stop tokens before a minimum length). Nothing the host computes
    changes between calls (positions come from the cache's device counter), so the call can be captured once
    as a CUDA graph and replayed, its outputs read from the tensors the captured call returned.
    """

    def __init__(self, model, cache: StaticCompressedCache):
        self.model, self.cache = model, cache
        batch = cache.layers[0].batch
        with torch.inference_mode(False):  # a normal tensor: copied into under any grad mode
            self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=cache.layers[0].device)
            vocab = model.get_output_embeddings().weight.shape[0]
            self.bias = torch.zeros(vocab, dtype=torch.float32, device=self.input_ids.device)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(
            input_ids=self.input_ids,
            position_ids=self.cache.position_ids(),
            **cache_kwargs(self.model, self.cache),
        )
        logits = out.logits[:, -1]
        return logits, (logits.float() + self.bias).argmax(dim=-1, keepdim=True)
