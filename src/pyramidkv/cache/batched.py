"""Compressing every layer at once when the prefill forward ends: one batch of scoring and selection kernels
per prompt instead of one per layer.

On a GPU a small model's prefill is bound by kernel launches, not arithmetic: SmolLM2-135M issues a few
dozen kernels per layer, and scoring plus selecting a layer's prompt (softmax of the observation window over
the keys, pooling, the GQA mean, two stable sorts, the gathers) issues as many again, so compressing each
layer right after its attention tripled the time to first token (``benchmarks/prefill_overhead.py``).
The arithmetic of those kernels is a few percent of the layer's. So, as continuous-batching servers batch
requests to amortise launches, the layers of one prompt are batched here: during the forward each layer's
keys and values go into one buffer (2, layers, batch, KV heads, n, head dim) and its observation-window
queries into another; after the last layer's attention the scorer, the schedule and
:func:`pyramidkv.policies.select` run over all layers as one batch (in groups of layers when their float32
scores would pass :data:`GROUP_BYTES`), and one gather per group copies every layer's kept tokens into one
allocation, of which each layer holds its own contiguous part: the bytes are those kept, not a padded
maximum.

The price is memory: until the forward ends the buffer holds the whole prompt's keys and values, as the
full cache does, where per-layer compression holds one layer's. Long prompts of large models are not
launch-bound, so ``CompressedCache``'s default batches only prompts whose whole cache fits
:data:`~pyramidkv.cache.compressed.BATCH_LIMIT`; ``compress_after="layer"`` never batches, and a chunked
prefill (``prefill_chunk``) bounds memory by the chunk.

The kept tokens are the same as per-layer compression's: each layer is scored from its own window queries
and keys; adaptive schedules allocate from the same per-layer preferences in the same layer order (on the
host, after one read of the preferences), so the same budgets come out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pyramidkv.cache.hook import valid_counts, valid_keys
from pyramidkv.cache.host import to_device
from pyramidkv.cache.selection import Selection
from pyramidkv.errors import PyramidKVError
from pyramidkv.policies import select

# float32 bytes of one group's keys (and of its attention weights), above which layers are scored in groups
GROUP_BYTES = 256 * 2**20


@dataclass
class LayerChoice:
    """What one layer keeps: its tokens (views into the group's allocation), row lengths, and whether rows
    keep different counts."""

    keys: Tensor
    values: Tensor
    lengths: Tensor
    ragged: bool


def gather_layers(store: Tensor, indices: Tensor, widths: list[int]) -> list[tuple[Tensor, Tensor]]:
    """Every layer's kept keys and values from ``store`` (2, g, batch, heads, n, dim) at ``indices`` (g x batch,
    heads, K), layer ``l`` keeping its first ``widths[l]`` slots per row: two gathers into one allocation.
    Returns per layer (keys, values), each (batch, heads, widths[l], dim). Layers of one width (a flat
    schedule) take a plain gather; a pyramid's widths, a gather through a table of flat positions built on the
    host."""
    _, layers, batch, heads, n, dim = store.shape
    width = indices.shape[-1]
    if set(widths) == {width}:
        grouped = indices.view(layers, batch, heads, width, 1).expand(-1, -1, -1, -1, dim)
        keys, values = store[0].gather(3, grouped), store[1].gather(3, grouped)
        return list(zip(keys.unbind(), values.unbind(), strict=True))
    rows = layers * batch * heads
    per_row = torch.tensor(widths, dtype=torch.long).repeat_interleave(batch * heads)
    total = batch * heads * sum(widths)
    row = torch.repeat_interleave(torch.arange(rows), per_row, output_size=total)
    starts = per_row.cumsum(0) - per_row
    column = torch.arange(total) - starts[row]
    table = to_device(torch.stack([row * width + column, row * n]), indices.device)
    take = indices.reshape(-1).index_select(0, table[0]) + table[1]
    keys = store[0].reshape(-1, dim).index_select(0, take)
    values = store[1].reshape(-1, dim).index_select(0, take)
    sizes = [batch * heads * w for w in widths]
    return [
        (k.view(batch, heads, w, dim), v.view(batch, heads, w, dim))
        for k, v, w in zip(keys.split(sizes), values.split(sizes), widths, strict=True)
    ]


class BatchedPrefill:
    """The prefill buffers of one cache and the compression of all its layers at the end of the forward
    (module docstring). Layers call :meth:`store` from ``update`` and the hook calls :meth:`observe` after
    each layer's attention; the last layer's observation compresses them all."""

    def __init__(self, selection: Selection, num_layers: int, limit: int | None = None):
        self.selection = selection
        self.num_layers = num_layers
        self.limit = limit  # the largest prompt cache (bytes, every layer) batched; None: any
        self.buffer: Tensor | None = None  # (2, layers, batch, kv_heads, n, dim)
        self.queries: Tensor | None = None  # (layers, batch, q_heads, window, dim)
        self.layers: list = []

    def store(self, layer, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor] | None:
        """Copy one layer's prompt keys and values into the buffer and return its views; None when this
        prefill is compressed layer by layer (keys and values of different shapes, or a prompt cache above
        ``limit``)."""
        index = layer.rank
        if index == 0:
            self._drop()
            size = 2 * self.num_layers * keys.nbytes
            if keys.shape == values.shape and (self.limit is None or size <= self.limit):
                self.buffer = keys.new_empty(2, self.num_layers, *keys.shape)
        buffer = self.buffer
        if buffer is None:
            return None
        if (
            index != len(self.layers)
            or buffer.shape[2:] != keys.shape
            or keys.shape != values.shape
        ):
            self._drop()
            raise PyramidKVError(
                f"compress_after: layer {index} of the prefill does not continue the batch of layers "
                f"0..{len(self.layers) - 1} (layers in another order, or keys of another shape); use "
                "compress_after='layer'"
            )
        slots = buffer[:, index].unbind()
        slots[0].copy_(keys)
        slots[1].copy_(values)
        self.layers.append(layer)
        return slots

    def holds(self, layer) -> bool:
        """Whether ``layer``'s prompt waits in the buffer (so the hook must not compress it now)."""
        return self.buffer is not None and bool(self.layers) and self.layers[-1] is layer

    def observe(self, layer, queries: Tensor, mask: Tensor | None, scaling: float) -> None:
        """Keep this layer's observation-window queries; after the last layer, compress every layer."""
        index = layer.rank
        window = min(self.selection.policy.window, queries.shape[-2])
        if index == 0:
            self.queries = queries.new_empty(
                self.num_layers, *queries.shape[:2], window, queries.shape[-1]
            )
        self.queries[index].copy_(queries[..., queries.shape[-2] - window :, :])
        if index == self.num_layers - 1:
            try:
                batch, _, n, _ = self.buffer.shape[2:]
                valid = valid_keys(mask, batch, n, self.buffer.device)
                self._compress(valid, valid_counts(mask, valid), scaling)
            finally:
                self._drop()

    def _drop(self) -> None:
        """Forget this prefill's buffers (the layers hold what they kept)."""
        self.buffer = self.queries = None
        self.layers = []

    def _compress(self, valid: Tensor, counts: list[int], scaling: float) -> None:
        """Every layer keeps what :func:`choose_layers` chose for it; ``valid`` (batch, n) marks real prompt
        tokens, ``counts`` their number per row, read on the host once per forward."""
        chosen = choose_layers(self.selection, self.queries, self.buffer, valid, scaling, counts)
        empty = self.buffer.new_empty(*self.buffer.shape[2:-2], 0, self.buffer.shape[-1])
        for layer, choice in zip(self.layers, chosen, strict=True):
            layer.adopt(choice, valid, counts, empty, self.queries[layer.rank], scaling)


def _groups(keys: Tensor, queries: Tensor) -> list[range]:
    """Consecutive layers whose float32 keys and window attention fit :data:`GROUP_BYTES` together."""
    _, layers, batch, heads, n, dim = keys.shape
    per_layer = 4 * batch * n * (heads * dim + queries.shape[2] * queries.shape[3])
    size = max(1, GROUP_BYTES // max(per_layer, 1))
    return [range(start, min(start + size, layers)) for start in range(0, layers, size)]


def choose_layers(
    selection: Selection,
    queries: Tensor,
    store: Tensor,
    valid: Tensor,
    scaling: float,
    counts: list[int],
) -> list[LayerChoice]:
    """What each layer keeps, from its window ``queries`` (layers, batch, q_heads, w, dim) and the prompt in
    ``store`` (2, layers, batch, kv_heads, n, dim), as :meth:`Selection.choose` would choose layer by layer."""
    policy, scorer = selection.policy, selection.policy.scorer
    layers, batch = store.shape[1], store.shape[2]
    groups = _groups(store, queries)
    scores: list[Tensor | None] = []
    preferences = []
    for group in groups:
        q = queries[group.start : group.stop].flatten(0, 1)
        k = store[0, group.start : group.stop].flatten(0, 1)
        v = valid.repeat(len(group), 1)
        if policy.schedule.adaptive and scorer is not None:
            preferences.append(policy.schedule.preference(q, k, v, scaling))
        scores.append(None if scorer is None else scorer.score(q, k, v, scaling))
    kept = _budgets(selection, preferences, counts, layers)
    found: list[LayerChoice] = []
    for group, group_scores in zip(groups, scores, strict=True):
        group_kept = [kept[layer] for layer in group]
        flat = [k for row in group_kept for k in row]
        rows = valid.repeat(len(group), 1)
        budgets = to_device(flat, store.device)
        if group_scores is None or all(
            k >= c for row in group_kept for k, c in zip(row, counts, strict=True)
        ):
            group_scores = torch.zeros(rows.shape[0], *store.shape[3:5], device=store.device)
        if policy.heads == "adaptive" and scorer is not None:
            heads = selection.head_budgets(group_scores, rows, budgets)
            indices, lengths = select(group_scores, rows, heads, policy.window)
            split = lengths.view(len(group), batch, -1)
            widths = split.amax(dim=(1, 2)).tolist()
            ragged = [bool((part != w).any()) for part, w in zip(split, widths, strict=True)]
        else:
            indices, lengths = select(group_scores, rows, budgets, policy.window, flat)
            widths = [min(max(row), store.shape[4]) for row in group_kept]
            ragged = [len(set(row)) > 1 for row in group_kept]
        pairs = gather_layers(store[:, group.start : group.stop], indices, widths)
        for (keys, values), part, uneven in zip(
            pairs, lengths.view(len(group), batch, -1), ragged, strict=True
        ):
            found.append(LayerChoice(keys, values, part, uneven))
    return found


def _budgets(
    selection: Selection, preferences: list[Tensor], counts: list[int], layers: int
) -> list[list[int]]:
    """[layer][row] tokens kept: the schedule's budgets, or an adaptive schedule's allocation run on the host
    in layer order from every layer's preference (one read of the device)."""
    batch = len(counts)
    if not preferences:
        budgets = [selection.layer_budgets(c, batch) if c else [0] * layers for c in counts]
        return [
            [min(budgets[b][layer], c) for b, c in enumerate(counts)] for layer in range(layers)
        ]
    schedule, policy = selection.policy.schedule, selection.policy
    wanted = torch.cat(preferences).view(layers, batch).tolist()
    progress = schedule.start(batch)
    averages = selection.averages(counts, counts)
    return [
        schedule.next_budgets(progress, wanted[layer], averages, counts, layers, policy.window)
        for layer in range(layers)
    ]
