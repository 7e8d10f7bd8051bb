"""Prefill once, compress many ways: the evaluation runner's way to compare policies and budgets fairly.

pyramidkv compresses a layer *after* that layer's attention has run over the full prompt, so the hidden
states a prefill produces are the same whatever the policy. One full forward therefore captures everything
any policy needs — each layer's keys, values and queries — and :meth:`Prefill.cache` rebuilds, without a
model forward, exactly the cache a fresh prefill with that policy and budget would have kept. The captured
tensors are never modified, so the full cache is "restored" between configurations for free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.cache.selection import Selection
from pyramidkv.cache.sliding import SlidingLayer


class _Recorder:
    """Stands in for the selection of a full cache's layers: records each layer's prefill queries, then keeps
    every token as the full policy does."""

    def __init__(self, selection: Selection, layers: int):
        self.selection = selection
        self.queries: list[torch.Tensor | None] = [None] * layers
        self.valid: torch.Tensor | None = None
        self.scaling = 1.0

    def choose(self, layer_idx, queries, keys, valid, scaling, seen=None, counts=None):
        self.queries[layer_idx] = queries
        self.valid, self.scaling = valid, scaling
        return self.selection.choose(layer_idx, queries, keys, valid, scaling, seen, counts)


@dataclass
class Prefill:
    """The captured prefill of one prompt: logits after it, and per layer its keys, values and queries."""

    model: object
    logits: torch.Tensor  # (batch, vocab) next-token logits after the prompt
    keys: list[torch.Tensor] = field(repr=False)
    values: list[torch.Tensor] = field(repr=False)
    queries: list[torch.Tensor] = field(repr=False)
    valid: torch.Tensor = field(repr=False)
    scaling: float = 1.0
    seconds: float = 0.0
    scores: dict = field(
        default_factory=dict, repr=False
    )  # (scorer, window, layer) -> token scores

    @property
    def length(self) -> int:
        return self.valid.shape[-1]

    def cache(
        self, policy: str = "pyramidkv", budget: str | int | float | None = None, **options
    ) -> CompressedCache:
        """The cache a fresh prefill with ``policy`` and ``budget`` would hold, built from the capture."""
        cache = CompressedCache(self.model, policy=policy, budget=budget, **options)
        cache.selection.score_memo = self.scores
        for layer, keys, values, queries in zip(
            cache.layers, self.keys, self.values, self.queries, strict=True
        ):
            if isinstance(layer, SlidingLayer):  # its window, as the prefill left it
                layer.restore(keys, values, self.length)
                continue
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values, layer.seen = keys, values, keys.shape[-2]
            # one valid mask serves every layer; with a split model (device_map) it follows each layer's device
            layer.compress(queries, self.valid.to(keys.device), self.scaling)
        return cache


def _held(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """A captured layer's keys and values: every prompt token, or a sliding layer's window."""
    if isinstance(layer, SlidingLayer):
        return layer.keys, layer.values
    return layer.kept_keys, layer.kept_values


def prefill(
    model, context_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> Prefill:
    """Run the prompt once with the full cache and capture what every policy needs."""
    import time

    capture = CompressedCache(model, policy="full", budget="100%", compress_after="layer")
    recorder = _Recorder(capture.selection, len(capture.layers))
    for layer in capture.layers:
        layer.selection = recorder
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model(
                context_ids.to(model.device),
                attention_mask=None if attention_mask is None else attention_mask.to(model.device),
                **cache_kwargs(model, capture),
            )
        seconds = time.perf_counter() - start
        return Prefill(
            model=model,
            logits=out.logits[:, -1].float(),
            keys=[_held(layer)[0] for layer in capture.layers],
            values=[_held(layer)[1] for layer in capture.layers],
            queries=[  # the recorder knows compressed layers by their rank
                None if isinstance(layer, SlidingLayer) else recorder.queries[layer.rank]
                for layer in capture.layers
            ],
            valid=recorder.valid,
            scaling=recorder.scaling,
            seconds=seconds,
        )
    finally:
        capture.close()


def greedy_rows(
    model,
    cache,
    logits: torch.Tensor,
    max_new_tokens: int,
    stop_ids: list[int] | tuple[int, ...] = (),
    append_ids: torch.Tensor | None = None,
) -> list[list[int]]:
    """Greedy tokens of every row of a prefilled ``cache``, starting from ``logits`` (rows or one row for all).

    ``append_ids`` (1, n) (context-only mode) are fed first to every row, uncompressed, and decoding starts
    from their last logits. A row ends at its first stop token, which is included in its result, as
    ``generate`` does; the batch steps on until every row has ended or ``max_new_tokens`` are out.
    """
    rows = cache.layers[0].keys.shape[0]
    device = model.device
    tokens: list[list[int]] = [[] for _ in range(rows)]
    ended = [False] * rows
    with torch.inference_mode():
        if append_ids is not None and append_ids.numel():
            step = append_ids.to(device).expand(rows, -1)
            logits = model(step, **cache_kwargs(model, cache)).logits[:, -1]
        logits = logits.expand(rows, -1)
        for _ in range(max_new_tokens):
            chosen = logits.argmax(dim=-1)
            for row, token in enumerate(chosen.tolist()):
                if not ended[row]:
                    tokens[row].append(token)
                    ended[row] = token in stop_ids
            if all(ended):
                break
            logits = model(chosen[:, None], **cache_kwargs(model, cache)).logits[:, -1]
    return tokens
