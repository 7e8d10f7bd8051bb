"""Kept tokens stored as codes: the quantized half of a compressed layer.

Eviction decides which tokens a layer keeps; a codec decides how each is stored. A coded layer holds
blocks of codes — the compressed prompt first (its rows ragged, one length per (sequence, KV head)), then
the flushes of the recent window, joined into one block where the codes are per token — and reads them
back one chunk at a time for attention, so a quantized cache is never decoded whole (KIVI, Liu et al.
2024, keeps the same fp16 residual window).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from pyramidkv.codecs import Codes, VectorCodes
from pyramidkv.codecs.registry import CodecPair


@dataclass
class _Block:
    keys: Codes
    values: Codes
    tokens: int
    lengths: (
        torch.Tensor | None
    )  # (batch, kv_heads) for the ragged prompt block, else every slot is valid
    codecs: CodecPair  # what encoded this block (a planned layer holds blocks of several rates)

    def visible(self, device: torch.device) -> torch.Tensor | None:
        """(batch, kv_heads, 1, tokens) bool, which slots of a ragged block hold a token; None when all do."""
        if self.lengths is None:
            return None
        slots = torch.arange(self.tokens, device=device)
        return (slots < self.lengths[..., None]).unsqueeze(-2)


def join_codes(first: Codes, then: Codes) -> Codes | None:
    """``first`` followed by ``then`` along the token axis, for codes stored per token (FibQuant, TurboQuant);
    None for codes grouped across tokens (KIVI's keys), which stay separate blocks."""
    if not (isinstance(first, VectorCodes) and isinstance(then, VectorCodes)):
        return None
    return replace(
        first,
        indices=torch.cat([first.indices, then.indices], dim=-2),
        norms=torch.cat([first.norms, then.norms], dim=-1),
    )


@dataclass
class CodedBlocks:
    """Blocks of key and value codes of one layer, read back chunk by chunk."""

    codecs: CodecPair
    blocks: list[_Block] = field(default_factory=list)

    def add(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        lengths: torch.Tensor | None = None,
        fused: bool = False,
        where: str = "layer",
        codecs: CodecPair | None = None,
    ) -> None:
        """Encode (batch, kv_heads, s, dim) keys and values as one block; ``lengths`` marks ragged rows.

        ``fused``: encode in the Triton kernel (:func:`pyramidkv.kernels.encode.fused_encode`); ``where``
        names the layer in an error (NaN or Inf in the keys or values); ``codecs``: this block's codecs when
        they are not the layer's (a rate of a planned layer, :mod:`.planned`).
        """
        if keys.shape[-2] == 0:
            return
        codecs = codecs or self.codecs
        codes_k, codes_v = self.encode(keys, values, fused, where, codecs)
        self.append(codes_k, codes_v, keys.shape[-2], lengths, codecs)

    def encode(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        fused: bool = False,
        where: str = "layer",
        codecs: CodecPair | None = None,
    ) -> tuple[Codes, Codes]:
        """Codes of (batch, kv_heads, s, dim) keys and values (arguments as :meth:`add`), not stored."""
        codecs = codecs or self.codecs
        names = f"{where} keys", f"{where} values"
        if fused:
            from pyramidkv.kernels.encode import fused_encode

            return (
                fused_encode(codecs.keys, keys, name=names[0]),
                fused_encode(codecs.values, values, name=names[1]),
            )
        return codecs.keys.encode(keys, names[0]), codecs.values.encode(values, names[1])

    def joined(self) -> tuple[Codes, Codes] | None:
        """Every block's key and value codes joined along the tokens, slots as :meth:`chunks` yields them;
        None without blocks, or when a block's codes are not per token or not of the layer's codecs."""
        if not self.blocks or any(b.codecs != self.codecs for b in self.blocks):
            return None
        keys, values = self.blocks[0].keys, self.blocks[0].values
        for block in self.blocks[1:]:
            keys, values = join_codes(keys, block.keys), join_codes(values, block.values)
            if keys is None or values is None:
                return None
        if not isinstance(keys, VectorCodes) or not isinstance(values, VectorCodes):
            return None
        return keys, values

    def append(
        self,
        keys: Codes,
        values: Codes,
        tokens: int,
        lengths: torch.Tensor | None = None,
        codecs: CodecPair | None = None,
    ) -> None:
        """Add codes made elsewhere (e.g. rows of several caches stacked) as one block of ``tokens`` slots.

        Dense codes (every row holds every slot) that follow a dense block of per-token codes join it, so a
        layer holds at most two blocks however long it decodes: the ragged prompt and what was generated.
        Each block costs a kernel launch per decode step; the copy costs one pass over the generated codes
        per flush of the window.
        """
        codecs = codecs or self.codecs
        last = self.blocks[-1] if self.blocks else None
        if lengths is None and last is not None and last.lengths is None and last.codecs == codecs:
            joined_keys, joined_values = (
                join_codes(last.keys, keys),
                join_codes(last.values, values),
            )
            if joined_keys is not None and joined_values is not None:
                self.blocks[-1] = _Block(
                    joined_keys, joined_values, last.tokens + tokens, None, codecs
                )
                return
        self.blocks.append(_Block(keys, values, tokens, lengths, codecs))

    def reorder(self, rows: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Keep rows ``rows`` of every block, in that order (beam search); ``lengths``: the layer's reordered
        row lengths, which the ragged prompt block shares (None: each ragged block reorders its own)."""
        for block in self.blocks:
            for name in ("keys", "values"):
                codes = getattr(block, name)
                tensors = {f.name: getattr(codes, f.name) for f in fields(codes)}
                picked = {
                    key: value.index_select(0, rows.to(value.device))
                    for key, value in tensors.items()
                    if isinstance(value, torch.Tensor)
                }
                setattr(block, name, replace(codes, **picked))
            if block.lengths is not None:
                block.lengths = (
                    lengths
                    if lengths is not None
                    else block.lengths.index_select(0, rows.to(block.lengths.device))
                )

    @property
    def tokens(self) -> int:
        """Slots held in flushed blocks (every row has all of them)."""
        return sum(b.tokens for b in self.blocks if b.lengths is None)

    def chunks(
        self, q_len: int, dtype: torch.dtype
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Decoded (keys, values, visible) per block, for :func:`~pyramidkv.kernels.chunked_attention`."""
        for block in self.blocks:
            keys = block.codecs.keys.decode(block.keys, dtype)
            values = block.codecs.values.decode(block.values, dtype)
            yield keys, values, block.visible(keys.device)

    def nbytes(self) -> int:
        """Bytes of the codes. A ragged block's ``lengths`` is the layer's own tensor, counted by the layer."""
        return sum(b.keys.nbytes + b.values.nbytes for b in self.blocks)

    def components(self) -> dict[str, int]:
        """Bytes per component: packed indices / ints, and norms / scales / zero-points."""
        parts = {"codes": 0, "side": 0}
        for b in self.blocks:
            for codes in (b.keys, b.values):
                for name, value in vars(codes).items():
                    if isinstance(value, torch.Tensor):
                        key = "codes" if name in ("indices", "packed") else "side"
                        parts[key] += value.numel() * value.element_size()
        return parts


def pad_slots(tensor: torch.Tensor, slots: int) -> torch.Tensor:
    """Pad dim 2 (the token slots of a (batch, kv_heads, s, ...) tensor) with zeros up to ``slots``."""
    missing = slots - tensor.shape[2]
    if not missing:
        return tensor
    pad = [0, 0] * (tensor.dim() - 3) + [0, missing]
    return F.pad(tensor, pad)


def gather_codes(codes: VectorCodes, indices: torch.Tensor) -> VectorCodes:
    """The per-token codes at ``indices`` (batch, kv_heads, K) of each row: the same codes, not re-encoded (a
    vector codebook's decoded vector does not encode back to its own code: its codewords are not unit vectors)."""
    index = indices.to(codes.norms.device)
    packed = index.unsqueeze(-1).expand(*index.shape, codes.indices.shape[-1])
    return replace(
        codes, indices=codes.indices.gather(2, packed), norms=codes.norms.gather(2, index)
    )


def stack_codes(parts: list[VectorCodes], slots: int) -> VectorCodes:
    """Per-token codes of several batches as one batch, each padded to ``slots`` token slots."""
    tensors = {
        f.name: torch.cat([pad_slots(getattr(p, f.name), slots) for p in parts])
        for f in fields(VectorCodes)
        if isinstance(getattr(parts[0], f.name), torch.Tensor)
    }
    return VectorCodes(dtype=parts[0].dtype, **tensors)
