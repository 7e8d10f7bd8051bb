"""The static-shape cache over FibQuant/TurboQuant codes: a decode step with codes, fit for one CUDA graph.

:mod:`pyramidkv.static.cache` holds eviction-only caches in static buffers. With a codec
(:class:`~pyramidkv.cache.compressed.CompressedCache` ``codec="fibquant:2"``) a layer holds codes (arXiv 2605.11478,
2504.19874) and an fp16 recent window that the dynamic cache flushes into codes as one block every
``residual`` tokens (KIVI's residual, Liu et al. 2024): a step whose work depends on the step. Here:

* a **store** of codes: key and value indices (batch, kv_heads, capacity, bytes) and norms, the source's
  blocks packed per row (row (b, h) valid up to ``lengths[b, h]``, a device int32 tensor the decode kernels
  read), then room for the tokens that will leave the window;
* a **ring** of exactly ``residual`` fp16 slots, key and value stacked (2, batch, kv_heads, R, d): the most
  recent tokens. At build it holds the source's window (w <= R tokens, slots [0, w)); the other slots are
  masked until written.

Every step does the same work: the token in ring slot ``(w + step) % R`` is encoded (:class:`Encoder`:
with the kernels, one launch of the fused encode kernel; else the codec's own arithmetic; neither with host
checks) and scattered into the store at each row's length,
the length grows by one when that slot held a token (from step R - w on), then the new token overwrites the
slot. So the fp16 window always holds the last min(R, w + step + 1) tokens exactly and every older token is
a code; the dynamic cache instead flushes R tokens at once, so the two agree while w + steps <= R. The slot
offset and the step from which slots hold tokens are device tensors, not constants of the captured step.

Under a decode budget (:mod:`.decoding`) the store holds the layer's largest share and the ring one interval
(``compress_every`` <= R, an empty window at build): every interval the layer selects again between two
replays (:meth:`StaticCodedLayer.candidates`, :meth:`StaticCodedLayer.keep`), the survivors keep their codes,
and the ring is emptied by rewriting its counters in place, as the dynamic layer ends each interval with an
empty window; so the two agree at every step.

Keys are stored centred as in the dynamic layer (:mod:`pyramidkv.cache.centring`): each new key has the
layer's shift subtracted before it enters the ring.

A layer of the memory planner (:class:`~pyramidkv.cache.planned.PlannedLayer`) holds its prompt at several
rates. Its blocks at the cache's own codec join the store; the others stay beside it as :class:`Frozen`
blocks, read at every step and never written (new tokens are coded at the cache's codec, as the dynamic
planned layer flushes them). All rates share the family's rotation, so the query is rotated once and each
block's kernel writes its splits into one workspace that the one epilogue merges.

Attention (one new token per step): on CUDA (or with ``kernel="triton"``) the query is rotated once, the
decode kernel writes the store's split partials into a workspace allocated at the first step, and one
:func:`~pyramidkv.kernels.epilogue.decode_epilogue` launch attends over the ring as its window (with the
mask of the slots that hold a token: they fill in ring order), merges, rotates back and writes the
model's layout. Elsewhere torch attends over the store in the codecs' rotated space, as the dynamic cache does
(:func:`~pyramidkv.kernels.reference.rotated_attention`). No step reads a device value on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyramidkv.cache import hook
from pyramidkv.cache.blocks import CodedBlocks, gather_codes, join_codes
from pyramidkv.cache.centring import uncentred
from pyramidkv.cache.protocol import ModelAttention
from pyramidkv.codecs import VectorCodes
from pyramidkv.codecs.packing import packed_bytes
from pyramidkv.codecs.registry import CodecPair
from pyramidkv.codecs.rotated import RotatedBlockCodec
from pyramidkv.errors import PyramidKVError
from pyramidkv.kernels.cuda_decode import MmaVariant
from pyramidkv.kernels.dispatch import fused_rows, launch_partials
from pyramidkv.kernels.encode import encode_buffers, encode_tables, launch_encode
from pyramidkv.kernels.epilogue import decode_epilogue
from pyramidkv.kernels.plan import DEFAULT_TUNING, make_workspace, plan_block, rotate_query
from pyramidkv.kernels.reference import rotated_attention
from pyramidkv.kernels.ring_commit import commit
from pyramidkv.static.base import StaticLayerBase
from pyramidkv.static.decoding import StaticDecodeBudget

ALIGN = 16  # store slots: a multiple of the mma kernel's tile, and 16-byte aligned index rows


class Encoder:
    """``codec.encode`` of (..., d) vectors as a fixed sequence of tensor operations: (indices uint8 (...,
    bytes), norms fp16 (...)). Without the codec's host-side checks, which a CUDA graph cannot run: a norm
    beyond fp16 is stored as inf. ``fused``: one launch of the encode kernel for a few vectors
    (:func:`~pyramidkv.kernels.encode.launch_encode` with ``few=True``: a step encodes 2 x
    batch x KV heads vectors; the codes of ``codec.encode`` up to ties at a cell border) instead of the
    codec's own arithmetic (:meth:`RotatedBlockCodec.quantize`, then :meth:`RotatedBlockCodec.pack`: ~10
    operations, and 4 to ~12 more to pack indices other than bytes). The kernel writes the packed bytes itself,
    in the codec's layout: a step packs nothing after it."""

    def __init__(
        self,
        codec: RotatedBlockCodec,
        device: torch.device,
        dtype: torch.dtype,
        fused: bool = False,
    ):
        self.codec = codec
        self.nbytes = packed_bytes(codec.blocks, codec.index_bits)
        self.compute = torch.float64 if dtype == torch.float64 else torch.float32
        # what each path reads, built once: the kernel's float32 tables, or the codec's own in ``compute``
        self.tables = encode_tables(codec, device) if fused else None
        self.rotation, self.codebook = (
            (None, None) if fused else codec.tensors(device, self.compute)
        )

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, self.codec.d)
        if self.tables is None:
            nu, nearest = self.codec.quantize(flat.to(self.compute), self.rotation, self.codebook)
            nu, packed = nu.to(torch.float16), self.codec.pack(nearest, check=False)
        else:
            packed, nu = encode_buffers(self.codec, flat.shape[0], x.device, few=True)
            launch_encode(self.codec, flat.contiguous(), self.tables, packed, nu, few=True)
        lead = x.shape[:-1]
        return packed.reshape(*lead, self.nbytes), nu.reshape(lead)


@dataclass
class Frozen:
    """Codes of another rate than the store's that a planned layer holds beside it: row (b, h) valid up to
    ``lengths[b, h]`` (int32, the kernels' operand); ``visible`` (batch, kv_heads, 1, width) is the same for
    the torch path. Written once, at build."""

    codecs: CodecPair
    keys: VectorCodes
    values: VectorCodes
    lengths: torch.Tensor
    visible: torch.Tensor

    @classmethod
    def of(cls, block) -> Frozen:
        """The static copy of one block of a :class:`~pyramidkv.cache.blocks.CodedBlocks`."""
        batch, kv_heads, width = block.keys.shape
        device = block.keys.norms.device
        lengths = (
            torch.full((batch, kv_heads), width, dtype=torch.int32, device=device)
            if block.lengths is None
            else block.lengths.to(torch.int32).contiguous()
        )
        visible = (torch.arange(width, device=device) < lengths[..., None]).unsqueeze(-2)
        return cls(block.codecs, block.keys, block.values, lengths, visible)


def empty_codes(codec: RotatedBlockCodec, like: torch.Tensor) -> VectorCodes:
    """No codes of ``codec`` for vectors like ``like`` (batch, kv_heads, n, d): (batch, kv_heads, 0) codes, a
    store that starts empty."""
    batch, kv_heads = like.shape[:2]
    width = packed_bytes(codec.blocks, codec.index_bits)
    indices = torch.zeros(batch, kv_heads, 0, width, dtype=torch.uint8, device=like.device)
    norms = torch.zeros(batch, kv_heads, 0, dtype=torch.float16, device=like.device)
    return VectorCodes(like.dtype, indices, norms)


def compact(blocks) -> tuple[VectorCodes, VectorCodes, torch.Tensor]:
    """A coded layer's blocks (:class:`~pyramidkv.cache.blocks.CodedBlocks` ``.blocks``) as one ragged block: row
    (b, h) holds its valid codes first, in order (the ragged prompt, then the flushed windows), then
    leftovers; and its (batch, kv_heads) lengths. Read once, when the static cache is built."""
    if not blocks or not all(isinstance(b.keys, VectorCodes) for b in blocks):
        raise PyramidKVError("source: expected a layer holding FibQuant or TurboQuant codes")
    valid = []
    for block in blocks:
        slots = torch.arange(block.tokens, device=block.keys.norms.device)
        limit = block.tokens if block.lengths is None else block.lengths[..., None]
        valid.append((slots < limit).expand(block.keys.shape))
    valid = torch.cat(valid, dim=-1)
    order = torch.sort((~valid).to(torch.uint8), dim=-1, stable=True).indices
    joined = []
    for side in ("keys", "values"):
        codes = [getattr(b, side) for b in blocks]
        indices = torch.cat([c.indices for c in codes], dim=-2)
        norms = torch.cat([c.norms for c in codes], dim=-1)
        gather = order.unsqueeze(-1).expand(*order.shape, indices.shape[-1])
        joined.append(
            VectorCodes(codes[0].dtype, indices.gather(-2, gather), norms.gather(-1, order))
        )
    return joined[0], joined[1], valid.sum(-1).to(torch.int32)


class StaticCodedLayer(StaticLayerBase):
    """One layer's store of codes and fp16 ring, updated by a fixed sequence of device operations (module doc)."""

    def __init__(
        self,
        layer_idx: int,
        codecs,
        keys: VectorCodes,
        values: VectorCodes,
        lengths: torch.Tensor,
        window_keys: torch.Tensor,
        window_values: torch.Tensor,
        residual: int,
        seen: int,
        max_new_tokens: int,
        fused: bool,
        frozen: list[Frozen] | None = None,
        key_shift: torch.Tensor | None = None,
        budget: StaticDecodeBudget | None = None,
    ):
        """``keys``/``values``: codes (batch, kv_heads, width) of which row (b, h) holds ``lengths[b, h]``
        first; ``window_keys``/``window_values`` (batch, kv_heads, w, d): the fp16 tokens after them,
        w <= ``residual``, the ring's size; ``seen`` tokens so far; ``fused``: attend with the kernels;
        ``frozen``: blocks of other rates read beside the store (a planned layer); ``key_shift`` (batch,
        kv_heads, 1, d): what the source layer subtracts from every key it stores (centred keys,
        :mod:`pyramidkv.cache.centring`), subtracted from each new key too; ``budget``: the layer's share of a
        decode budget (module docstring: an empty window, ``compress_every`` <= ``residual``)."""
        batch, kv_heads, held, dim = window_keys.shape
        if not residual >= 1 or held > residual:
            raise PyramidKVError(
                f"residual: got {residual!r}; expected an integer >= {max(1, held)}"
            )
        if budget is not None and (held or budget.every > residual):
            raise PyramidKVError(
                f"compress_every: got {budget.every} with a window of {residual} tokens holding {held}; a "
                "static cache with codes keeps a decode budget when every interval fits its empty window "
                "(compress_every <= residual, built right after the prefill)"
            )
        super().__init__(layer_idx, seen, max_new_tokens)
        self.codecs, self.fused, self.residual, self.held = codecs, fused, residual, held
        self.budget, self.compacted = budget, False
        self.frozen = list(frozen or [])
        self.key_shift = None if key_shift is None else key_shift.to(window_keys.device).clone()
        self.device, self.dtype, self.batch = window_keys.device, window_keys.dtype, batch
        widest = int(lengths.max())  # one host read per layer, at build
        self.kept_width = widest  # store slots the longest row uses (a decode budget's candidates)
        if budget is None:
            # tokens that will leave the ring; >= 1: steps before it is full write one slot past the rows
            leaving = max(1, held + max_new_tokens - residual)
        else:  # the largest share over the generation; the ring never overflows, one slot past the rows
            widest, leaving = budget.width(widest, seen + max_new_tokens), 1
        self.width = widest
        self.capacity = -(-(widest + leaving) // ALIGN) * ALIGN
        self.store = [self._stored(codes, self.kept_width) for codes in (keys, values)]
        self.lengths = lengths.to(self.device, torch.int32).clone()
        self.built_lengths = self.lengths.clone()
        self.window = torch.stack([window_keys, window_values]).clone()  # for rewind
        self.ring = window_keys.new_zeros(2, batch, kv_heads, residual, dim)
        self.ring[:, :, :, :held] = self.window
        self.keys, self.values = self.ring[0], self.ring[1]
        slots = torch.arange(residual, device=self.device)
        self.order = torch.where(slots < held, -1, slots - held)  # new token of each slot, -1: held
        self.built_order = self.order.clone()
        self.slots = torch.arange(self.capacity, device=self.device)
        self.step = torch.zeros((), dtype=torch.long, device=self.device)
        self.slot = torch.full((1,), held % residual, dtype=torch.long, device=self.device)
        # the ring as device state, so a compaction can empty it under a captured step: new token t goes to
        # slot (t + offset) mod R, and the slot it leaves held a token from step full_at on
        self.offset = torch.tensor(held, dtype=torch.long, device=self.device)
        self.full_at = torch.tensor(residual - held, dtype=torch.long, device=self.device)
        # steps since the last compaction (a decode budget's interval)
        self.filled = torch.zeros((), dtype=torch.long, device=self.device)
        self.visible = self.order < 0  # ring slots the queries being decoded see (updated in place)
        self.same = codecs.keys == codecs.values  # one encode of keys and values stacked
        self.encoders = [
            Encoder(c, self.device, self.dtype, fused) for c in (codecs.keys, codecs.values)
        ]
        self.rotation = codecs.values.tensors(self.device, torch.float32)[0]
        self.plans: dict[int, tuple] = {}  # query rows -> kernel, split, workspace

    def _stored(self, codes: VectorCodes, widest: int) -> VectorCodes:
        batch, kv_heads, _ = codes.shape
        indices = codes.indices.new_zeros(batch, kv_heads, self.capacity, codes.indices.shape[-1])
        norms = codes.norms.new_zeros(batch, kv_heads, self.capacity)
        indices[:, :, :widest] = codes.indices[:, :, :widest]
        norms[:, :, :widest] = codes.norms[:, :, :widest]
        return VectorCodes(codes.dtype, indices.to(self.device), norms.to(self.device))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Encode the token leaving the ring into the store, put the new one in its slot (module doc)."""
        q_len = key_states.shape[-2]
        if q_len != 1:
            raise PyramidKVError(
                f"key_states: got {q_len} tokens; a static cache with codes takes one per step "
                "(feed longer inputs to the source cache before building it)"
            )
        if self.budget is not None:
            self.budget.reserve(q_len)
        self._reserve(q_len)
        # centred keys: one subtraction in the dtype, which computes and rounds as centring.centred does
        if self.key_shift is not None:
            key_states = key_states - self.key_shift
        leaving = self.ring.index_select(3, self.slot)  # (2, batch, kv_heads, 1, d)
        if self.same:
            indices, norms = self.encoders[0](leaving)
            codes = [(indices[0], norms[0]), (indices[1], norms[1])]
        else:
            codes = [encode(x) for encode, x in zip(self.encoders, leaving, strict=True)]
        # one launch (kernels/ring_commit.py) for what _commit does in ~12 operations
        if self.fused:
            commit(
                codes, self.store, self.lengths, key_states, value_states, self.ring, self.step,
                self.order, self.visible, self.slot, self.offset, self.full_at,
            )  # fmt: skip
        else:
            self._commit(codes, key_states, value_states)
        self.step.add_(1)
        if self.budget is not None:
            self.filled.add_(1)
        hook.announce(self)
        return self.keys, self.values

    def _commit(self, codes, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The leaving token's codes into the store at each row's length, the length grown once the ring is
        full, the new token into its slot, the mask and the next slot: in torch, the kernel's reference."""
        at = self.lengths.long().unsqueeze(-1)  # (batch, kv_heads, 1): each row's next free slot
        for store, (indices, norms) in zip(self.store, codes, strict=True):
            store.indices.scatter_(2, at.unsqueeze(-1).expand_as(indices), indices)
            store.norms.scatter_(2, at, norms)
        self.lengths.add_(self.step >= self.full_at)  # the slot held a token
        self.ring.index_copy_(3, self.slot, torch.stack([key_states, value_states]))
        torch.le(self.order, self.step, out=self.visible)
        self.slot.copy_((self.step + 1 + self.offset).remainder(self.residual))

    def attend(
        self, query: torch.Tensor, scaling: float, model_attention: ModelAttention | None = None
    ) -> torch.Tensor:
        """Attention of (batch, q_heads, 1, d) queries over the store and the ring; (batch, 1, q_heads, d)."""
        if self.budget is not None:
            self.budget.remember(query, self.filled, scaling)
        if self.fused and fused_rows(query, self.keys.shape[1]):
            return self._attend_fused(query, scaling)
        coded = (self.slots < self.lengths.unsqueeze(-1)).unsqueeze(-2)
        window = self.visible.view(1, 1, 1, -1)
        blocks = [(f.keys, f.values, f.visible, f.codecs) for f in self.frozen]
        blocks.append((*self.store, coded, self.codecs))
        out = rotated_attention(query, self.codecs, blocks, self.keys, self.values, window, scaling)
        return out.transpose(1, 2).contiguous()

    def _blocks(self) -> list[tuple[CodecPair, VectorCodes, VectorCodes, torch.Tensor]]:
        """What the kernels read per step: each frozen block, then the store (codecs, keys, values, lengths)."""
        frozen = [(f.codecs, f.keys, f.values, f.lengths) for f in self.frozen]
        return [*frozen, (self.codecs, *self.store, self.lengths)]

    def _plan(self, rows: int) -> tuple[list[tuple[MmaVariant | None, int]], tuple]:
        """Kernel and split of each block (:meth:`_blocks`) for ``rows`` query rows per KV head, and their
        shared workspace: chosen and allocated once, at the first step (before any capture)."""
        if rows not in self.plans:
            batch, kv_heads = self.lengths.shape
            plans = [
                plan_block(
                    keys.shape, codecs.keys, codecs.values, rows, DEFAULT_TUNING, self.device
                )
                for codecs, keys, _, _ in self._blocks()
            ]
            with torch.inference_mode(False):  # written in place under any grad mode
                workspace = make_workspace(
                    batch,
                    kv_heads,
                    rows,
                    sum(s for _, s in plans),
                    self.ring.shape[-1],
                    self.device,
                )
            self.plans[rows] = (plans, workspace)
        return self.plans[rows]

    def _attend_fused(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        kv_heads = self.lengths.shape[1]
        rows = query.shape[1] // kv_heads
        plans, workspace = self._plan(rows)
        # every rate shares the family's rotation: one rotated query for all blocks
        q_rot = rotate_query(
            query, self.codecs.keys, scaling, kv_heads, DEFAULT_TUNING.codebook_dtype
        )
        offset = 0
        for (codecs, keys, values, lengths), (kernel, split) in zip(
            self._blocks(), plans, strict=True
        ):
            launch_partials(
                q_rot, keys, values, codecs.keys, codecs.values, lengths, workspace, offset, split,
                DEFAULT_TUNING, kernel,
            )  # fmt: skip
            offset += split
        return decode_epilogue(
            workspace, self.rotation, query, self.keys, self.values, scaling, self.visible
        )

    def rewind(self, appended: int) -> None:
        """Back to the state of the build (``appended`` = 0): the tokens that left the ring since are codes
        now, so no other step can be restored."""
        if appended:
            raise PyramidKVError(
                f"appended: got {appended}; a static cache with codes rewinds only to 0 (the tokens "
                "that left its fp16 window are codes now)"
            )
        if self.compacted:
            raise PyramidKVError(
                "appended: a static cache that selected again under its decode budget cannot rewind (the "
                "tokens it evicted are gone)"
            )
        self.ring[:, :, :, : self.held] = self.window
        self.lengths.copy_(self.built_lengths)
        self.step.zero_()
        self.filled.zero_()
        self.slot.fill_(self.held % self.residual)
        self.offset.fill_(self.held)
        self.full_at.fill_(self.residual - self.held)
        self.order.copy_(self.built_order)
        torch.lt(self.order, 0, out=self.visible)
        if self.budget is not None:
            self.budget.since = 0
        self._recount(0)

    def candidates(self, since: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """What a decode budget's compaction scores (:meth:`StaticDecodeBudget.compact
        <pyramidkv.static.decoding.StaticDecodeBudget.compact>`), in the dynamic layer's order: the store's
        codes decoded, then the ``since`` tokens of the ring in the order they came. Returns their keys as the
        model made them (batch, kv_heads, n, d), which hold a token (batch, n), and their codes, the ring's
        encoded as the dynamic layer encodes its window (:meth:`~pyramidkv.cache.blocks.CodedBlocks.encode`)."""
        width = self.kept_width
        stored = [
            VectorCodes(codes.dtype, codes.indices[:, :, :width], codes.norms[:, :, :width])
            for codes in self.store
        ]
        window_keys, window_values = self.ring[0][:, :, :since], self.ring[1][:, :, :since]
        window = CodedBlocks(self.codecs).encode(window_keys, window_values, self.fused, "layer")
        keys = torch.cat([self.codecs.keys.decode(stored[0], self.dtype), window_keys], dim=-2)
        # every KV head of a row holds as many tokens: head 0's count marks the row's slots
        held = self.slots[:width] < self.lengths[:, :1].long()
        valid = torch.cat([held, held.new_ones(self.batch, since)], dim=1)
        codes = tuple(join_codes(a, b) for a, b in zip(stored, window, strict=True))
        return uncentred(keys, self.key_shift), valid, codes

    def keep(self, indices: torch.Tensor, lengths: torch.Tensor, codes: tuple) -> None:
        """Hold only the candidates at ``indices`` (batch, kv_heads, K), row (b, h) up to ``lengths[b, h]``, as
        their own ``codes`` in store slots ``[0, K)``, and empty the ring: in place, so a captured step goes on
        reading the same tensors (the next new token goes to slot 0, and none leaves the ring before the next
        compaction)."""
        width = indices.shape[-1]
        if width > self.width:
            raise PyramidKVError(f"indices: {width} kept slots; the layer holds {self.width}")
        for store, picked in zip(self.store, codes, strict=True):
            chosen = gather_codes(picked, indices)
            store.indices[:, :, :width] = chosen.indices
            store.norms[:, :, :width] = chosen.norms
        self.lengths.copy_(lengths.to(torch.int32))
        step = int(self.step)  # one host read: the step the next replay writes
        self.order.copy_(torch.arange(step, step + self.residual, device=self.device))
        self.visible.zero_()
        self.slot.zero_()
        self.offset.fill_(-step % self.residual)
        self.full_at.fill_(step + self.residual)
        self.filled.zero_()
        self.kept_width, self.compacted = width, True

    def nbytes(self) -> int:
        tensors = [t for codes in self.store for t in (codes.indices, codes.norms)]
        tensors += [
            t for f in self.frozen for t in (f.keys.indices, f.keys.norms, f.values.indices)
        ]
        tensors += [t for f in self.frozen for t in (f.values.norms, f.lengths)]
        tensors += [self.lengths, self.built_lengths, self.ring, self.window, self.order, self.slot]
        tensors += [self.visible, self.step, self.offset, self.full_at, self.filled]
        tensors += [] if self.key_shift is None else [self.key_shift]
        # a decode budget's ring of queries, once allocated
        ring = getattr(self.budget, "queries", None)
        tensors += [] if ring is None else [ring]
        return sum(t.numel() * t.element_size() for t in tensors)


def coded_layer(
    layer, residual: int, max_new_tokens: int, fused: bool, budget: StaticDecodeBudget | None = None
) -> StaticCodedLayer:
    """The static copy of a prefilled :class:`~pyramidkv.cache.compressed.CompressedLayer` holding codes, or of
    a planned layer (its blocks at other rates than the cache's codec frozen beside the store); ``budget``: its
    share of the source's decode budget."""
    if getattr(layer, "kept_keys", None) is not None:
        raise PyramidKVError(
            f"source: layer {layer.layer_idx} keeps tokens whole beside its codes (the planner kept it whole, "
            "its bytes holding its prompt); the static cache holds codes only: decode it with the "
            "CompressedCache itself, or plan with rates of codes only (plan='auto:2+3+4')"
        )
    own = layer.coded.codecs
    mine = [b for b in layer.coded.blocks if b.codecs == own]
    frozen = [Frozen.of(b) for b in layer.coded.blocks if b.codecs != own]
    if mine:
        keys, values, lengths = compact(mine)
    else:  # every prompt token at another rate: the store starts empty
        keys, values = (empty_codes(c, layer.keys) for c in (own.keys, own.values))
        lengths = torch.zeros(*layer.keys.shape[:2], dtype=torch.int32, device=layer.keys.device)
    return StaticCodedLayer(
        layer.layer_idx, own, keys, values, lengths, layer.keys, layer.values,
        residual, layer.seen, max_new_tokens, fused, frozen, layer.key_shift, budget,
    )  # fmt: skip
