"""Bounded memory while generating: every ``compress_every`` new tokens, each layer selects again from all it
holds what the decode budget keeps.

Only the prompt used to be compressed; each generated token was appended, so a long answer (a reasoning
trace, a long summary) grew the cache without bound. kvpress's ``DecodingPress`` compresses every N steps
during generation, TensorRT-LLM evicts at decode, and R-KV (Cai et al. 2025, arXiv 2505.24133) shows that
reasoning traces keep their accuracy at a small fraction of their cache. Here a layer holds at most its share
of ``decode_budget`` plus ``compress_every`` tokens: after every ``compress_every`` tokens (and only when it
holds more than its share), it rescores its kept and appended tokens and keeps its share
(:meth:`~pyramidkv.cache.layers.CompressedLayer.decode_compress`). With a codec the kept tokens are codes:
they are decoded to be scored and the survivors keep their own codes, so no full-precision copy is held.

Which queries score: the queries of the tokens generated since the last compression, kept per layer (the
last ``window`` of them for SnapKV and PyramidKV, whose observation window they are; all of them for H2O,
whose accumulated attention restarts at each compression: the heavy hitters of the recent interval, not of
the whole sequence, since the prompt's per-token sums are not kept). StreamingLLM keeps its sinks and the most
recent tokens. The decode budget is spread over the layers by the policy's schedule, as the prompt budget.
An interval that evicts nothing still ends as a compression would: a coded layer encodes its window (every
interval ends with the window empty, so the CUDA-graph path's fixed ring holds one interval,
:mod:`pyramidkv.static.decoding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyramidkv.cache.selection import Selection


@dataclass(frozen=True)
class DecodeCompression:
    """A cache's generation-time compression: ``selection`` holds the policy and the decode budget,
    ``every`` the tokens between compressions."""

    selection: Selection
    every: int

    @property
    def query_limit(self) -> int:
        """Queries an interval keeps for its compression: all of them for scorers that read every query
        (H2O), else the policy's observation window."""
        scorer = self.selection.policy.scorer
        every_query = scorer is not None and scorer.needs_all_queries
        return self.every if every_query else self.selection.policy.window

    def after_step(self, layer, query: torch.Tensor, scaling: float) -> None:
        """Called after each attention of ``layer`` past the prompt: keep the queries the next compression
        scores with, and compress when ``every`` tokens have come and the layer holds more than its share."""
        layer.remember(query, self.query_limit)
        if layer.appended_since < self.every:
            return
        seen = max(layer.real) + layer.appended_since
        share = self.selection.layer_budgets(seen, len(layer.real))[layer.rank]
        if layer.slots() > share:
            layer.decode_compress(scaling, self.selection)
        else:  # nothing to evict yet: the tokens so far count as seen, and the next interval starts
            layer.settle()
            layer.real = layer.end_interval()
