"""The layers of a :class:`~pyramidkv.cache.compressed.CompressedCache`: what one attention layer keeps.

Each layer stores two segments, both at KV-head size (batch, kv_heads, seq, head_dim) like transformers'
own caches:

* **kept** — the prompt tokens the policy kept, gathered at prefill. Every (sequence, KV head) row has its
  own length (``lengths``): per-layer budgets (PyramidKV), per-row budgets of a left-padded batch and
  per-head selection all fit this one layout, and a fused kernel reads it as a ragged array.
* **recent** — tokens appended after the prompt (generated tokens, or a question appended to a compressed
  context), the same count for every row.

:class:`CompressedLayer` keeps its tokens in the model's dtype; :class:`CodedLayer` stores them as codes
(:mod:`.blocks`) and encodes the recent window whenever it fills (KIVI, Liu et al. 2024, keeps the same
fp16 residual window). Positions of new tokens continue from the original prompt length:
``get_seq_length`` counts the tokens seen, not the tokens kept, so RoPE positions and masks line up with the
uncompressed sequence.

**Centred keys.** A layer whose keys are coded (``center``) stores every key minus one shift per (row, KV
head), taken when the prompt is first compressed: the keys' mean weighted by the observation window's attention
(:mod:`.centring`, which says why). The softmax ignores the shift, since ``q.(k - m)`` differs from ``q.k`` by
one constant per query, so with everything the layer stores centred (codes, whole tokens, the recent window)
attention needs no correction; :meth:`CompressedLayer.held` adds the shift back, so scorers see the model's
own keys.
"""

from __future__ import annotations

import torch

from pyramidkv.cache import hook
from pyramidkv.cache.batched import BatchedPrefill, LayerChoice
from pyramidkv.cache.blocks import CodedBlocks, gather_codes, join_codes, pad_slots, stack_codes
from pyramidkv.cache.centring import attended_mean, centred, uncentred
from pyramidkv.cache.compat import first_positions
from pyramidkv.cache.decoding import DecodeCompression
from pyramidkv.cache.protocol import CacheLayer, ModelAttention
from pyramidkv.cache.selection import Selection
from pyramidkv.codecs import RotatedBlockCodec, VectorCodes
from pyramidkv.codecs.registry import CodecPair
from pyramidkv.errors import PyramidKVError, UnsupportedModelError
from pyramidkv.kernels import chunked_attention, fused_attention, fused_rows, use_fused
from pyramidkv.kernels.reference import rotated_attention


def _causal(recent: int, q_len: int, device) -> torch.Tensor:
    """(q_len, recent) bool: appended slot ``r`` is visible to new query ``i`` when ``r <= recent - q_len + i``."""
    steps = torch.arange(recent, device=device)
    limit = recent - q_len + torch.arange(q_len, device=device)
    return steps[None, :] <= limit[:, None]


def _empty_window(states: torch.Tensor) -> torch.Tensor:
    """An empty recent window shaped like ``states``, on a storage of its own: a ``[..., :0, :]`` slice would
    keep the whole prompt's keys or values alive behind it until the next append."""
    return states.new_empty(*states.shape[:-2], 0, states.shape[-1])


def _bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class CompressedLayer(CacheLayer):
    """One attention layer's compressed cache, kept tokens in the model's dtype (module docstring)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, layer_idx: int, selection: Selection, rank: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        # position among the cache's compressed layers (sliding-window layers are not): the schedule's index
        self.rank = layer_idx if rank is None else rank
        self.selection = selection
        self.seen = 0
        self.compressed = False
        self.ragged = False  # whether kept rows have different lengths (then decode needs a mask)
        self.kept_keys: torch.Tensor | None = None
        self.kept_values: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None  # (batch, kv_heads) tokens kept per row
        self.prompt_tokens = self.prompt_bytes = (
            0  # the prompt's length, and bytes held once compressed
        )
        # whether inputs of several tokens after the first are chunks of the prompt
        self.chunked = False
        self.real: list[int] | None = None  # real (unpadded) prompt tokens per row so far
        self.batched_prefill: BatchedPrefill | None = None
        self.decoding: DecodeCompression | None = None
        # generation under a decode budget: queries and tokens since the last compression
        self.queries_since: torch.Tensor | None = None
        self.appended_since = 0
        # a chunked prefill's headroom: the selection its chunks keep, and the last chunk's window queries
        # and scaling until the budget is selected from what they kept (:meth:`end_chunks`)
        self.chunk_selection: Selection | None = None
        self.pending: tuple[torch.Tensor, float] | None = None
        self.center = False  # store keys minus key_shift (module docstring); the cache sets it
        # (batch, kv_heads, 1, dim), taken at the first compression
        self.key_shift: torch.Tensor | None = None

    @property
    def prefilling(self) -> bool:
        """True until the prompt has been compressed."""
        return not self.compressed

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys, self.values = _empty_window(key_states), _empty_window(value_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif self.prefilling:
            raise UnsupportedModelError(
                f"model: layer {self.layer_idx} never called pyramidkv's attention function; its attention "
                "does not go through transformers' AttentionInterface, so it cannot be compressed"
            )
        elif key_states.shape[-2] > 1:
            self._check_continues(args, kwargs)
        elif self.pending is not None:  # the first generated token: the chunked prefill has ended
            self.end_chunks()
        if self.compressed:
            key_states = self._centred(key_states)
        self._before_append()
        stored = (
            self.batched_prefill.store(self, key_states, value_states)
            if self.batched_prefill is not None and self.prefilling
            else None
        )
        if stored is None:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        else:
            self.keys, self.values = stored
        self.seen += key_states.shape[-2]
        hook.announce(self)
        return self.keys, self.values

    def _check_continues(self, args: tuple, kwargs: dict) -> None:
        """Refuse tokens that do not continue the held sequence (a second prompt through a used cache): a
        compressed layer cannot take the prompt back. Checked for inputs of several tokens only, so a decode
        step reads nothing on the host."""
        positions = first_positions(args, kwargs)
        if positions is not None and int(positions.max()) < self.seen:
            raise PyramidKVError(
                f"cache: layer {self.layer_idx} holds a sequence of {self.seen} tokens and the new input "
                f"starts at position {int(positions.max())}; a CompressedCache holds one sequence: use a new "
                "cache for a new prompt, or call cache.reset() first"
            )

    def _before_append(self) -> None:
        """What the layer does with its recent window before new tokens join it (a coded layer encodes it)."""

    def compress(
        self,
        queries: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
        seen: list[int] | None = None,
        counts: list[int] | None = None,
        selection: Selection | None = None,
    ) -> None:
        """Keep what the policy selects from the prompt just prefilled, and free the rest. ``counts``: the
        valid tokens of each row, when the caller read them on the host; ``seen``: the real tokens of each
        row's prompt so far, when more than the candidates (a chunked prefill, or generation);
        ``selection``: the budgets to keep, when not the prompt's (generation's ``decode_budget``)."""
        counts = valid.sum(dim=1).tolist() if counts is None else counts
        self.real = counts if seen is None else seen
        self._set_shift(queries, valid, scaling)
        self._select(
            queries, valid, scaling, counts, selection or self._prompt_selection(queries, scaling)
        )
        self._finish(_empty_window(self.keys), _empty_window(self.values))

    def adopt(
        self,
        choice: LayerChoice,
        valid: torch.Tensor,
        counts: list[int],
        empty: torch.Tensor,
        queries: torch.Tensor,
        scaling: float,
    ) -> None:
        """Hold what the batched compression of every layer chose for this one (:mod:`.batched`); ``valid``
        (batch, n): the prompt's real tokens; ``empty``: an empty recent window every layer may share;
        ``queries``: this layer's observation window."""
        self.real = counts
        self._set_shift(queries, valid, scaling)
        self._keep(choice.keys, choice.values, choice.lengths)
        self.lengths, self.ragged = choice.lengths, choice.ragged
        self._finish(empty, empty)

    def _set_shift(self, queries: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        """At the first compression of a centred layer: the keys' mean over the real candidates ``valid``
        (batch, n), weighted by the attention of the last ``window`` of ``queries``
        (:func:`.centring.attended_mean`). It stays for the cache's life (a chunk or a decode-time compression keeps it), so every stored key has
        the same shift."""
        if not self.center or self.key_shift is not None:
            return
        window = min(self.selection.policy.window, queries.shape[-2]) or 1
        self.key_shift = attended_mean(self.keys, queries[..., -window:, :], valid, scaling)

    def _centred(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys`` as this layer stores them (:func:`.centring.centred`)."""
        return centred(keys, self.key_shift)

    def _uncentred(self, keys: torch.Tensor) -> torch.Tensor:
        """Stored keys as the model made them (:func:`.centring.uncentred`)."""
        return uncentred(keys, self.key_shift)

    def _finish(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The prompt is compressed: the recent window starts as ``keys``/``values`` (empty)."""
        self.keys, self.values = keys, values
        self.compressed = True
        self.prompt_tokens, self.prompt_bytes = self.seen, self.nbytes()

    def _select(
        self,
        queries: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
        counts: list[int],
        selection: Selection,
    ) -> None:
        """Keep, of the window, what the policy selects."""
        chosen = selection.choose(self.rank, queries, self.keys, valid, scaling, self.real, counts)
        self._keep_selected(chosen.indices, chosen.lengths)
        self.lengths = chosen.lengths
        self.ragged = chosen.ragged  # known here, so no decode step reads it from the device

    def _keep_selected(self, indices: torch.Tensor, lengths: torch.Tensor) -> None:
        """Keep the tokens at ``indices`` (batch, kv_heads, K) of the window, row (b, h) valid up to
        ``lengths[b, h]``."""
        gather = indices.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        self._keep(self.keys.gather(2, gather), self.values.gather(2, gather), lengths)

    def _keep(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> None:
        """Store the kept tokens (batch, kv_heads, K, dim), row (b, h) valid up to ``lengths[b, h]``."""
        self.kept_keys, self.kept_values = self._centred(keys), values

    def recompress(self, queries: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        """After a chunk of the prompt (``valid`` (batch, q_len): its real tokens) has attended to what the
        layer holds: select again, from the kept tokens and the chunk, what the budget of the prompt so far
        keeps (chunked prefill, :class:`~pyramidkv.cache.compressed.CompressedCache`'s ``prefill_chunk``).

        Kept codes are decoded to be scored and the survivors keep their codes (:meth:`CodedLayer.recompress`).
        A layer holds at most its budget plus one chunk at any time."""
        # tokens appended one at a time since the last compression: all real
        earlier = self.keys.shape[-2] - valid.shape[1]
        recent = torch.cat([valid.new_ones(valid.shape[0], earlier), valid], dim=1)
        seen = [a + b for a, b in zip(self.real, recent.sum(dim=1).tolist(), strict=True)]
        self._reselect(queries, recent, scaling, seen, self._prompt_selection(queries, scaling))

    def _prompt_selection(self, queries: torch.Tensor, scaling: float) -> Selection:
        """What a prompt, or a chunk of one, keeps: the budget, or during a chunked prefill with headroom
        ``prefill_headroom`` times it, the window's ``queries`` remembered to select the budget when the
        prefill ends (:meth:`end_chunks`)."""
        if not self.chunked or self.chunk_selection is None:
            return self.selection
        window = min(self.selection.policy.window, queries.shape[-2])
        self.pending = (queries[..., -window:, :], scaling)
        return self.chunk_selection

    def end_chunks(self) -> None:
        """After a chunked prefill that kept ``prefill_headroom`` times the budget: keep the budget of what is
        held, scored by the last chunk's window queries (the prompt's end, where a question sits)."""
        if self.pending is None:
            return
        queries, scaling = self.pending
        self.pending = None
        held = torch.ones(
            self.keys.shape[0], self.keys.shape[-2], dtype=torch.bool, device=self.keys.device
        )
        self._reselect(queries, held, scaling, list(self.real), self.selection)

    def remember(self, query: torch.Tensor, limit: int) -> None:
        """Keep this step's queries (batch, q_heads, q_len, dim) among the last ``limit`` since the last
        compression: generation's recompression scores with them (:mod:`.decoding`)."""
        held = self.queries_since
        joined = query if held is None else torch.cat([held, query], dim=-2)
        self.queries_since = joined[..., -limit:, :]
        self.appended_since += query.shape[-2]

    def decode_compress(self, scaling: float, selection: Selection) -> None:
        """Select again, from every token held, what ``selection``'s budget keeps, scored by the queries kept
        since the last compression (generation's bounded memory, :mod:`.decoding`). The tokens generated
        since then are all real."""
        recent = torch.ones(
            self.keys.shape[0], self.keys.shape[-2], dtype=torch.bool, device=self.keys.device
        )
        queries = self.queries_since
        self._reselect(queries, recent, scaling, self.end_interval(), selection)

    def settle(self) -> None:
        """End a decode-budget interval that evicts nothing as a compression would leave the layer (a coded
        layer encodes its window); the tokens stay where they are."""

    def end_interval(self) -> list[int]:
        """The real tokens of each row seen so far, the interval's generated tokens counted; the next
        interval starts with no queries and no tokens."""
        seen = [real + self.appended_since for real in self.real]
        self.queries_since, self.appended_since = None, 0
        return seen

    def _reselect(
        self,
        queries: torch.Tensor,
        recent: torch.Tensor,
        scaling: float,
        seen: list[int],
        selection: Selection,
    ) -> None:
        """Compress again what the layer holds and its ``recent`` window ((batch, r) bool: real tokens), the
        queries sitting on the last candidates."""
        keys, values, held = self.held()
        candidates = torch.cat([held, recent.to(held.device)], dim=1)
        self._drop_kept()
        self.keys = torch.cat([keys, self._uncentred(self.keys)], dim=-2)
        self.values = torch.cat([values, self.values], dim=-2)
        self.compress(queries, candidates, scaling, seen, selection=selection)

    def held(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tokens kept of the prompt and flushed since, in the model's dtype: keys (the shift added back)
        and values (batch, kv_heads, n, dim) and which slots hold a token (batch, n). Every KV head of a row
        holds as many."""
        parts = self._held_parts()
        batch, heads, _, dim = self.keys.shape
        if not parts:
            empty = self.keys.new_zeros(batch, heads, 0, dim)
            return empty, empty, torch.zeros(batch, 0, dtype=torch.bool, device=self.keys.device)
        keys = self._uncentred(torch.cat([k.to(self.dtype) for k, _, _ in parts], dim=-2))
        values = torch.cat([v.to(self.dtype) for _, v, _ in parts], dim=-2)
        held = torch.cat(
            [
                torch.ones(batch, k.shape[-2], dtype=torch.bool, device=k.device)
                if visible is None
                else visible.reshape(batch, heads, -1)[:, 0]
                for k, _, visible in parts
            ],
            dim=1,
        )
        return keys, values, held

    def _held_parts(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(keys, values, visible slots or None) of each part of what :meth:`held` joins."""
        if self.kept_keys is None:
            return []
        slots = torch.arange(self.kept_keys.shape[-2], device=self.kept_keys.device)
        return [(self.kept_keys, self.kept_values, slots < self._kept_lengths()[..., None])]

    def _drop_kept(self) -> None:
        """Forget the kept tokens (:meth:`recompress` has read them)."""
        self.kept_keys = self.kept_values = self.lengths = None

    def attend(
        self, query: torch.Tensor, scaling: float, model_attention: ModelAttention
    ) -> torch.Tensor:
        """The model's own attention over the kept tokens, then the recent ones, under their mask."""
        q_len = query.shape[-2]
        keys, values, mask = self.attention_inputs(
            q_len, query.shape[1], model_attention.float_mask,
            model_attention.padding(self.keys.shape[-2], q_len),
        )  # fmt: skip
        return model_attention.decode(query, keys, values, mask, scaling)

    def attention_inputs(
        self, q_len: int, q_heads: int, as_float: bool, padding: torch.Tensor | None = None
    ):
        """Keys, values (kept then recent) and a mask for ``q_len`` new queries; ``None`` when nothing is masked.

        Kept slot ``c`` of row (b, h) is visible when ``c < lengths[b, h]``; recent slot ``r`` is visible to
        new query ``i`` when ``r <= R - q_len + i`` (causal among the new tokens) and ``padding`` (batch, 1,
        q_len, R), when given, lets it.
        """
        keys = torch.cat([self.kept_keys, self.keys], dim=-2)
        values = torch.cat([self.kept_values, self.values], dim=-2)
        batch, kv_heads, capacity, _ = self.kept_keys.shape
        recent = self.keys.shape[-2]
        if q_len == 1 and not self.ragged:
            return keys, values, None
        slots = torch.arange(capacity, device=keys.device)
        kept = (
            (slots < self.lengths[..., None]).unsqueeze(-2).expand(batch, kv_heads, q_len, capacity)
        )
        causal = _causal(recent, q_len, keys.device).expand(batch, kv_heads, q_len, recent)
        if padding is not None:
            causal = causal & padding.to(keys.device)
        mask = torch.cat([kept, causal], dim=-1).repeat_interleave(q_heads // kv_heads, dim=1)
        if as_float:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=keys.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min
            )
        return keys, values, mask

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(columns, first position) of the model's 4-D mask: only the recent window and the new tokens, the
        columns a layer reads (:meth:`~pyramidkv.cache.protocol.ModelAttention.padding`; kept prompt tokens
        are masked by the layer itself). A chunk of a long prompt then builds a (chunk, window + chunk) mask,
        not one over every position seen, which grew with the prompt (2 GB per chunk of 4,096 at 512k)."""
        recent = self.keys.shape[-2] if isinstance(self.keys, torch.Tensor) else 0
        return recent + query_length, self.seen - recent

    def get_max_length(self) -> int:
        return -1

    def components(self) -> dict[str, int]:
        """Bytes held per component: codes and their side information (norms, scales), kept tokens in the
        model's dtype, the recent window, the row lengths and the key shifts (centred keys)."""
        return {
            "codes": 0,
            "side": 0,
            "kept_fp": _bytes(self.kept_keys, self.kept_values),
            "recent": _bytes(self.keys, self.values),
            "lengths": _bytes(self.lengths),
            "shift": _bytes(self.key_shift),
        }

    def rates(self) -> list[dict]:
        """What the prompt is kept as, per rate: ``bits`` (None: the model's dtype), ``tokens`` per (row, KV
        head) and ``bytes`` held (:meth:`CompressedCache.memory_report` lists it per layer)."""
        if self.kept_keys is None:
            return []
        tokens = self._kept_lengths().tolist()
        return [{"bits": None, "tokens": tokens, "bytes": _bytes(self.kept_keys, self.kept_values)}]

    def _kept_lengths(self) -> torch.Tensor:
        """(batch, kv_heads) tokens held in ``kept_keys``."""
        return self.lengths

    def tensors(self) -> list[torch.Tensor]:
        """The uncoded tensors this layer holds (a coded layer's blocks count through :meth:`nbytes`)."""
        found = [
            self.kept_keys,
            self.kept_values,
            self.lengths,
            self.keys,
            self.values,
            self.key_shift,
        ]
        return [t for t in found if isinstance(t, torch.Tensor)]

    def nbytes(self) -> int:
        return _bytes(*self.tensors())

    def kept_tokens(self) -> torch.Tensor:
        """(batch, kv_heads) tokens this layer holds: kept prompt tokens plus appended ones."""
        recent = self.appended_tokens()
        if self.lengths is None:
            return torch.full((1, 1), recent, dtype=torch.long)
        return self.lengths + recent

    def slots(self) -> int:
        """Token slots a row holds at most (known on the host): kept slots plus the recent window."""
        kept = self.kept_keys.shape[-2] if self.kept_keys is not None else 0
        return kept + self.keys.shape[-2]

    def appended_tokens(self) -> int:
        """Tokens held after the prompt, the same for every row."""
        return self.keys.shape[-2] if self.keys is not None else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in ("kept_keys", "kept_values", "lengths", "keys", "values", "key_shift"):
            tensor = getattr(self, name)
            if isinstance(tensor, torch.Tensor):
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` in that order, repeats allowed (transformers' ``Cache.batch_select_indices``;
        a server repeating one prefilled prompt over a batch uses it): the reordering beam search does."""
        self.reorder_cache(indices)

    def stackable(self) -> bool:
        """Whether :meth:`stack_rows` can take this layer as a row: compressed, batch 1, nothing appended."""
        return self.compressed and self.lengths.shape[0] == 1 and not self.keys.shape[-2]

    def stack_rows(self, rows: list[CompressedLayer]) -> None:
        """Become the batch of ``rows`` (:meth:`stackable` layers of one prompt), row i holding what ``rows[i]``
        kept: the evaluation decodes many configurations of one prompt as one batch."""
        self.lazy_initialization(rows[0].keys, rows[0].values)
        self.keys = torch.cat([r.keys for r in rows])
        self.values = torch.cat([r.values for r in rows])
        self.seen, self.compressed = rows[0].seen, True
        self.lengths = torch.cat([r.lengths for r in rows])
        if rows[0].key_shift is not None:
            self.key_shift = torch.cat([r.key_shift for r in rows])
        slots = self._stack_kept(rows)
        self.ragged = bool((self.lengths != slots).any())

    def _stack_kept(self, rows: list[CompressedLayer]) -> int:
        """The rows' kept tokens as one batch, padded to the longest; returns its slots."""
        slots = max(r.kept_keys.shape[2] for r in rows)
        self.kept_keys = torch.cat([pad_slots(r.kept_keys, slots) for r in rows])
        self.kept_values = torch.cat([pad_slots(r.kept_values, slots) for r in rows])
        return slots

    def reset(self) -> None:
        self.kept_keys = self.kept_values = self.lengths = self.keys = self.values = None
        self.is_initialized = self.compressed = self.ragged = False
        self.seen = self.prompt_tokens = self.prompt_bytes = self.appended_since = 0
        self.real = self.queries_since = self.key_shift = None


class CodedLayer(CompressedLayer):
    """One attention layer's compressed cache with the kept tokens stored as codes (:mod:`.blocks`).

    New tokens wait in a window of ``residual`` tokens in the model's dtype that is encoded as one block
    when it fills. ``kernel`` / ``fused_ok``: the cache's choice of attention path
    (:func:`pyramidkv.kernels.use_fused`).
    """

    def __init__(
        self,
        layer_idx: int,
        selection: Selection,
        codecs: CodecPair,
        residual: int,
        kernel: str,
        fused_ok: bool,
        rank: int | None = None,
    ):
        super().__init__(layer_idx, selection, rank)
        self.coded = CodedBlocks(codecs)
        self._candidates: tuple | None = None  # codes of every candidate during a recompress
        self.residual = residual
        self.kernel, self.fused_ok = kernel, fused_ok

    @property
    def _where(self) -> str:
        return f"layer {self.layer_idx}"

    def _fused(self, device: torch.device) -> bool:
        return use_fused(self.kernel, self.fused_ok, device)

    def _before_append(self) -> None:
        """Encode the recent window as one block when it is full."""
        if self.compressed and self.keys.shape[-2] >= self.residual:
            self.settle()

    def settle(self) -> None:
        """Encode the recent window as one block (a full window; or, ending a decode-budget interval that
        evicts nothing, as a recompression that keeps everything would)."""
        if self.keys.shape[-2]:
            self.coded.add(
                self.keys, self.values, fused=self._fused(self.keys.device), where=self._where
            )
            self.keys, self.values = _empty_window(self.keys), _empty_window(self.values)

    def _keep(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> None:
        keys = self._centred(keys)
        self.coded.add(keys, values, lengths, fused=self._fused(keys.device), where=self._where)

    def _reselect(self, queries, recent, scaling, seen, selection) -> None:
        """As :meth:`CompressedLayer._reselect`; the candidates' codes (every block's, and the recent
        window's, encoded once) are set aside so that the tokens kept keep their own codes."""
        held = self.coded.joined()
        fused = self._fused(self.keys.device)
        window = self.coded.encode(self.keys, self.values, fused, self._where)
        if held is None:
            self._candidates = window
        else:
            self._candidates = join_codes(held[0], window[0]), join_codes(held[1], window[1])
        super()._reselect(queries, recent, scaling, seen, selection)

    def _keep_selected(self, indices: torch.Tensor, lengths: torch.Tensor) -> None:
        """From the candidates' own codes after a chunk (:meth:`recompress`), else encoded."""
        candidates, self._candidates = self._candidates, None
        if candidates is None:
            return super()._keep_selected(indices, lengths)
        keys, values = (gather_codes(codes, indices) for codes in candidates)
        self.coded.append(keys, values, indices.shape[-1], lengths)

    def _held_parts(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Every block of codes, decoded, then what the base layer keeps."""
        return [*self.coded.chunks(1, self.dtype), *super()._held_parts()]

    def _drop_kept(self) -> None:
        super()._drop_kept()
        self.coded = CodedBlocks(self.coded.codecs)

    def attend(
        self, query: torch.Tensor, scaling: float, model_attention: ModelAttention | None = None
    ) -> torch.Tensor:
        """Attention of (batch, q_heads, q_len, dim) queries over coded blocks, then the fp16 recent window.

        The fused kernel reads the codes directly (on CUDA with ``kernel="auto"``, or when forced); elsewhere
        FibQuant and TurboQuant codes are attended in torch in their rotated space
        (:func:`pyramidkv.kernels.reference.rotated_attention`), and KIVI's decoded one block at a time.
        Returns (batch, q_len, q_heads, dim) as transformers' attention functions do.
        """
        q_len, recent = query.shape[-2], self.keys.shape[-2]
        padding = None if model_attention is None else model_attention.padding(recent, q_len)
        if self._fused(query.device) and padding is None and fused_rows(query, self.keys.shape[1]):
            return fused_attention(query, self.coded, self.keys, self.values, scaling)
        causal = _causal(recent, q_len, query.device)[None, None]
        if padding is not None:
            causal = causal & padding.to(query.device)
        codecs = self.coded.codecs
        if all(isinstance(c, RotatedBlockCodec) for c in (codecs.keys, codecs.values)):
            blocks = [(b.keys, b.values, b.visible(query.device)) for b in self.coded.blocks]
            out = rotated_attention(query, codecs, blocks, self.keys, self.values, causal, scaling)
        else:
            chunks = [*self.coded.chunks(q_len, self.dtype), (self.keys, self.values, causal)]
            out = chunked_attention(query, chunks, scaling)
        return out.transpose(1, 2).contiguous()

    def components(self) -> dict[str, int]:
        return {**super().components(), **self.coded.components()}

    def rates(self) -> list[dict]:
        """Also each block of prompt codes (the ragged blocks; generated tokens are not the prompt's)."""
        found = super().rates()
        for block in self.coded.blocks:
            if block.lengths is not None:
                tokens, held = block.lengths.tolist(), block.keys.nbytes + block.values.nbytes
                found.append({"bits": block.codecs.bits, "tokens": tokens, "bytes": held})
        return found

    def nbytes(self) -> int:
        return super().nbytes() + self.coded.nbytes()

    def slots(self) -> int:
        return super().slots() + sum(block.tokens for block in self.coded.blocks)

    def appended_tokens(self) -> int:
        return super().appended_tokens() + self.coded.tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.coded.reorder(beam_idx, self.lengths)

    def stackable(self) -> bool:
        """Also: one block of per-token codes (the compressed prompt; nothing was flushed yet)."""
        blocks = self.coded.blocks
        return (
            super().stackable()
            and len(blocks) == 1
            and isinstance(blocks[0].keys, VectorCodes)
            and isinstance(blocks[0].values, VectorCodes)
        )

    def _stack_kept(self, rows: list[CompressedLayer]) -> int:
        slots = max(r.coded.blocks[0].tokens for r in rows)
        blocks = [r.coded.blocks[0] for r in rows]
        self.coded.append(
            stack_codes([b.keys for b in blocks], slots),
            stack_codes([b.values for b in blocks], slots),
            slots,
            self.lengths,
        )
        return slots

    def reset(self) -> None:
        super().reset()
        self.coded = CodedBlocks(self.coded.codecs)
