"""A decode budget on the CUDA-graph path: the static cache's layers select again every ``compress_every`` steps,
in place, between two replays of the captured step.

:class:`~pyramidkv.cache.decoding.DecodeCompression` bounds a :class:`~pyramidkv.cache.compressed.CompressedCache`
while it generates by rebuilding each layer's tensors; a captured CUDA graph reads fixed addresses and fixed
shapes, so here a layer of :class:`~pyramidkv.static.buffers.StaticBufferLayer` holds ``width`` slots for the
tokens kept (its largest share of the decode budget over the generation) and ``every`` slots for the tokens
of one interval. The captured step writes its token at slot ``width + filled`` and its query into a ring of
the last queries (device counters, no host value). Every ``every`` steps the loop that replays the graph calls
:meth:`StaticDecodeBudget.compact` eagerly: the layer's policy scores everything held with the interval's
queries, exactly as the eager cache's recompression does (the same :meth:`~pyramidkv.cache.selection.Selection.choose`
on the same candidates in the same order), the survivors are copied into slots ``[0, width)``, the mask order
is rewritten in place and ``filled`` goes back to 0, so the next replay continues where the graph expects.
Memory is the fixed ``width + every`` slots per layer however long the generation runs.

With codes (:class:`~pyramidkv.static.coded.StaticCodedLayer`) the store holds the kept codes and the fp16 ring
the interval's tokens: when ``every`` is at most the ring's ``residual``, no token leaves the ring between two
compactions, exactly as the eager coded layer's window never flushes between its recompressions. A
compaction scores the store's codes decoded and the ring's tokens, encodes the ring as the eager layer
encodes its window, writes the survivors' own codes into the store and empties the ring (its slot counters
are device tensors, rewritten in place).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyramidkv.cache.decoding import DecodeCompression
from pyramidkv.errors import PyramidKVError
from pyramidkv.policies import select


@dataclass
class StaticDecodeBudget:
    """One static layer's share of a decode budget: ``decoding`` (the source cache's policy, budget and
    interval), the layer's ``rank`` among compressed layers, and each row's real tokens seen (``real``) when
    the interval began. ``queries`` is the ring of the interval's last queries (allocated at the first step)."""

    decoding: DecodeCompression
    rank: int
    real: list[int]
    since: int = 0  # steps of this interval (host count of the replays)
    scaling: float | None = None
    queries: torch.Tensor | None = field(default=None, repr=False)

    @property
    def every(self) -> int:
        return self.decoding.every

    @property
    def limit(self) -> int:
        """Queries the ring keeps (:attr:`DecodeCompression.query_limit`; one slot at least)."""
        return max(1, self.decoding.query_limit)

    def share(self, seen: int) -> int:
        """Tokens this layer keeps of a sequence of ``seen`` real tokens."""
        return self.decoding.selection.layer_budgets(seen, len(self.real))[self.rank]

    def width(self, held: int, most: int) -> int:
        """Slots for kept tokens: what the layer holds now, and its largest share up to ``most`` tokens seen."""
        return max(held, self.share(max(self.real)), self.share(most))

    def reserve(self, q_len: int) -> None:
        """Count a step of ``q_len`` tokens, refusing what the graph path cannot hold."""
        if q_len != 1:
            raise PyramidKVError(
                f"key_states: got {q_len} tokens; a static cache with a decode budget takes one per step"
            )
        if self.since >= self.every:
            raise PyramidKVError(
                f"compress_every: the layer holds {self.every} new tokens since its last compression; call "
                "StaticCompressedCache.after_step() after every step (generate(cuda_graph=True) does)"
            )
        self.since += 1

    def remember(self, query: torch.Tensor, filled: torch.Tensor, scaling: float) -> None:
        """Write this step's query (batch, q_heads, 1, dim) into the ring, at the slot of the token count
        ``filled`` (already counting it), on the device."""
        if self.queries is None:
            batch, heads, _, dim = query.shape
            with torch.inference_mode(False):  # written in place under any grad mode
                self.queries = query.new_zeros(batch, heads, self.limit, dim)
        self.scaling = scaling
        slot = (filled - 1).remainder(self.limit).view(1)
        self.queries.index_copy_(2, slot, query)

    def interval_queries(self) -> torch.Tensor:
        """The interval's last queries in order (batch, q_heads, min(limit, since), dim)."""
        count = min(self.limit, self.since)
        start = self.since - count
        order = [(start + j) % self.limit for j in range(count)]
        return self.queries[:, :, order]

    def compact(self, layer) -> None:
        """Select again, in place, what ``layer`` keeps of everything it holds; the interval ends (module
        docstring). The layer gives its candidates in the eager cache's order and layout, the kept slots then
        the interval's tokens (position matters to scorers that pool over neighbours, SnapKV's):
        ``layer.candidates(since)`` -> (keys, valid (batch, n), what ``layer.keep`` needs of them)."""
        if self.since == 0:
            return
        selection = self.decoding.selection
        seen = [real + self.since for real in self.real]
        keys, valid, held = layer.candidates(self.since)
        counts = valid.sum(dim=1).tolist()
        if max(counts) > self.share(max(seen)):
            chosen = selection.choose(
                self.rank, self.interval_queries(), keys, valid, self.scaling, seen, counts
            )
            indices, lengths = chosen.indices, chosen.lengths
        else:  # nothing to evict yet: every held token moves to the kept slots, in order
            scores = torch.zeros(*keys.shape[:2], keys.shape[-2], device=keys.device)
            indices, lengths = select(
                scores, valid, torch.tensor(counts, device=keys.device), 0, counts
            )
        layer.keep(indices, lengths, held)
        self.real, self.since = seen, 0


def check_static_budget(source) -> None:
    """Refuse what the graph path does not hold under a decode budget: tokens appended since the last
    compression (with codes they would sit in the window the static ring must start without)."""
    if any(getattr(layer, "appended_since", 0) for layer in source.layers):
        raise PyramidKVError(
            "source: a CompressedCache with decode_budget that generated since its last compression; build "
            "the static cache right after the prefill"
        )
