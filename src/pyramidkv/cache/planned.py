"""A planned layer: prompt tokens at several rates in one layer, as the memory planner chose them.

:class:`PlannedLayer` holds what :class:`~pyramidkv.cache.planner.Planner` kept of the prompt: one block of codes
per bit width (each block with its own codecs and row lengths, :mod:`.blocks`) and the tokens kept whole in the
model's dtype. Attention reads every block and the whole tokens as chunks of one softmax; on CUDA the fused
kernels read each block of codes in place (all rates share the codec family's rotation, so the query is
rotated once) and the whole tokens join the fp16 window of the epilogue. Tokens appended after the prompt are
flushed at the cache's own codec, as in :class:`~pyramidkv.cache.layers.CodedLayer`.
"""

from __future__ import annotations

import torch

from pyramidkv.cache.layers import CodedLayer, CompressedLayer, _bytes, _causal
from pyramidkv.cache.planner import Planner
from pyramidkv.cache.selection import Selection
from pyramidkv.codecs.registry import CodecPair
from pyramidkv.kernels import chunked_attention, fused_attention, fused_rows


class PlannedLayer(CodedLayer):
    """One attention layer's prompt kept at the rates the planner chose (module docstring)."""

    def __init__(
        self,
        layer_idx: int,
        selection: Selection,
        planner: Planner,
        codecs: CodecPair,
        residual: int,
        kernel: str,
        fused_ok: bool,
        rank: int | None = None,
    ):
        super().__init__(layer_idx, selection, codecs, residual, kernel, fused_ok, rank)
        self.planner = planner
        self.whole_lengths: torch.Tensor | None = None  # (batch, kv_heads) tokens kept whole

    def _select(
        self,
        queries: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
        counts: list[int],
        selection: Selection,
    ) -> None:
        """Keep, of the window, the planner's tiers (the planner holds the layer's selection)."""
        tiers = self.planner.plan(
            self.rank, queries, self.keys, self.values, valid, scaling, self.real, counts,
            fused=self._fused(self.keys.device), key_shift=self.key_shift,
        )  # fmt: skip
        dim = self.keys.shape[-1]
        for tier, indices, lengths in tiers:
            gather = indices.unsqueeze(-1).expand(-1, -1, -1, dim)
            keys, values = self._centred(self.keys.gather(2, gather)), self.values.gather(2, gather)
            if tier.codecs is None:
                self.kept_keys, self.kept_values, self.whole_lengths = keys, values, lengths
            else:
                fused = self._fused(keys.device)
                self.coded.add(
                    keys, values, lengths, fused=fused, where=self._where, codecs=tier.codecs
                )
        self.ragged = True

    def _reselect(self, queries, recent, scaling, seen, selection) -> None:
        """After a chunk of the prompt: plan again from every token held, each rate's decoded and the chunk's,
        what the bytes of the prompt so far keep. A token that stays at its rate is coded again from its
        decoded value, which gives back its code up to rounding (a codeword's own cell); one that moves to
        another rate is coded from that value."""
        CompressedLayer._reselect(self, queries, recent, scaling, seen, selection)

    def _whole_dense(self) -> bool:
        """Whether every row keeps all its whole-token slots (so they can join the fused epilogue's window)."""
        return self.whole_lengths is None or bool(
            (self.whole_lengths == self.kept_keys.shape[-2]).all()
        )

    def attend(self, query: torch.Tensor, scaling: float, model_attention=None) -> torch.Tensor:
        """Attention of (batch, q_heads, q_len, dim) queries over every rate's block, the whole tokens and the
        recent window: (batch, q_len, q_heads, dim)."""
        q_len, recent = query.shape[-2], self.keys.shape[-2]
        padding = None if model_attention is None else model_attention.padding(recent, q_len)
        fused = self._fused(query.device) and fused_rows(query, self.keys.shape[1])
        if fused and self._whole_dense() and padding is None:
            keys, values = self.keys, self.values
            if self.kept_keys is not None:
                keys = torch.cat([self.kept_keys, keys], dim=-2)
                values = torch.cat([self.kept_values, values], dim=-2)
            return fused_attention(query, self.coded, keys, values, scaling)
        chunks = list(self.coded.chunks(q_len, self.dtype))
        if self.kept_keys is not None:
            slots = torch.arange(self.kept_keys.shape[-2], device=query.device)
            visible = (slots < self.whole_lengths[..., None]).unsqueeze(-2)
            chunks.append((self.kept_keys, self.kept_values, visible))
        causal = _causal(recent, q_len, query.device)[None, None]
        if padding is not None:
            causal = causal & padding.to(query.device)
        chunks.append((self.keys, self.values, causal))
        return chunked_attention(query, chunks, scaling).transpose(1, 2).contiguous()

    def tensors(self) -> list[torch.Tensor]:
        """Also the row lengths of the whole tokens and of every block of codes."""
        own = [self.whole_lengths] + [b.lengths for b in self.coded.blocks]
        return super().tensors() + [t for t in own if isinstance(t, torch.Tensor)]

    def components(self) -> dict[str, int]:
        parts = super().components()
        parts["lengths"] += _bytes(self.whole_lengths, *(b.lengths for b in self.coded.blocks))
        return parts

    def _kept_lengths(self) -> torch.Tensor:
        return self.whole_lengths

    def kept_tokens(self) -> torch.Tensor:
        held = [b.lengths for b in self.coded.blocks if b.lengths is not None]
        if self.whole_lengths is not None:
            held.append(self.whole_lengths)
        if not held:
            return torch.full((1, 1), self.appended_tokens(), dtype=torch.long)
        return torch.stack(held).sum(dim=0) + self.appended_tokens()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in ("kept_keys", "kept_values", "whole_lengths", "keys", "values", "key_shift"):
            tensor = getattr(self, name)
            if isinstance(tensor, torch.Tensor):
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))
        self.coded.reorder(beam_idx)

    def stackable(self) -> bool:
        """Planned caches are decoded one configuration at a time (their blocks differ per prompt)."""
        return False

    def _drop_kept(self) -> None:
        super()._drop_kept()
        self.whole_lengths = None

    def reset(self) -> None:
        super().reset()
        self.whole_lengths = None
