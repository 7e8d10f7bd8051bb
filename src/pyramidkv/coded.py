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

from .codecs import KIVI, Codec, Codes, FibQuant, TurboQuant, VectorCodes
from .codecs.planes import ALIGN as PLANE_ALIGN
from .codecs.planes import BITS as PLANE_BITS
from .errors import PyramidKVError

CODEC_NAMES = ("none", "fibquant", "turboquant", "uniform", "kivi")
# "uniform": TurboQuant on its best uniform grid, whose 2-bit keys the CUDA kernel reads with no codebook
DEFAULT_BITS = {"fibquant": 2.0, "turboquant": 2, "uniform": 2, "kivi": 2}
# the normalise-rotate-quantize codecs: the fused kernels read their codes, and they pair as keys/values
# ("uniform/fibquant": uniform-grid keys, FibQuant values)
ROTATED_CODECS = ("fibquant", "turboquant", "uniform")


@dataclass(frozen=True)
class CodecPair:
    """The codecs of keys and values, and the name they were asked for by."""

    name: str
    keys: Codec
    values: Codec

    def bytes_per_token(self, head_dim: int) -> float:
        """Stored bytes of one token of one KV head (key + value), side information included."""
        bits = self.keys.bits_per_coordinate(True) + self.values.bits_per_coordinate(True)
        return bits * head_dim / 8

    def label(self) -> str:
        return f"{self.name}:{_rate(self.keys):g}" + (
            "" if _rate(self.keys) == _rate(self.values) else f"/{_rate(self.values):g}"
        )


def _rate(codec: Codec) -> float:
    return float(getattr(codec, "rate", None) or codec.bits)


def parse_codec(spec: str | None) -> tuple[str, float | None]:
    """``"fibquant:2"`` -> ("fibquant", 2.0); ``"uniform/fibquant"`` -> keys of one codec, values of another;
    ``"none"`` or ``None`` -> ("none", None)."""
    if spec is None:
        return "none", None
    name, _, bits = str(spec).strip().lower().partition(":")
    sides = name.split("/")
    if not (
        name in CODEC_NAMES or (len(sides) == 2 and all(side in ROTATED_CODECS for side in sides))
    ):
        raise PyramidKVError(
            f"codec: got {spec!r}; expected one of {', '.join(CODEC_NAMES)} or keys/values of "
            f"{', '.join(ROTATED_CODECS)} (uniform/fibquant), optionally :bits"
        )
    if not bits:
        return name, None
    try:
        return name, float(bits)
    except ValueError:
        raise PyramidKVError(
            f"codec: bits in {spec!r} must be a number, e.g. fibquant:2 or kivi:4"
        ) from None


def make_codecs(
    spec: str | None,
    head_dim: int,
    bits: float | None = None,
    key_bits: float | None = None,
    value_bits: float | None = None,
    seed: int = 0,
) -> CodecPair | None:
    """Codecs for one model's head dimension; ``None`` when nothing is quantized.

    ``bits`` (or the ``name:bits`` suffix) sets both; ``key_bits`` / ``value_bits`` override one side.
    FibQuant takes fractional rates (0.75 bit comes from k=8, N=64); TurboQuant and KIVI whole bits.
    """
    name, suffix = parse_codec(spec)
    if name == "none":
        if any(b is not None for b in (bits, key_bits, value_bits)):
            raise PyramidKVError(
                "bits: a rate needs a codec (--codec fibquant, turboquant or kivi)"
            )
        return None
    base = bits if bits is not None else suffix if suffix is not None else default_bits(name)
    kb = key_bits if key_bits is not None else base
    vb = value_bits if value_bits is not None else base
    try:
        if name == "kivi":
            whole = [_whole_bits(b, name) for b in (kb, vb)]
            return CodecPair(name, KIVI(whole[0], axis="channel"), KIVI(whole[1], axis="token"))
        keys, _, values = name.partition("/")
        return CodecPair(
            name,
            _rotated(keys, head_dim, kb, seed, keys=True),
            _rotated(values or keys, head_dim, vb, seed, keys=False),
        )
    except PyramidKVError:
        raise  # already names its parameter
    except (TypeError, ValueError) as exc:
        raise PyramidKVError(f"bits: {exc}") from exc


def default_bits(name: str) -> float:
    """The rate a codec (or a keys/values pair: its keys') takes when none is given."""
    return DEFAULT_BITS[name.partition("/")[0]]


def _rotated(name: str, head_dim: int, bits: float, seed: int, keys: bool) -> Codec:
    """One side of a pair: FibQuant at any rate, TurboQuant on its Lloyd-Max table or its uniform grid. Keys of
    the uniform grid at 3 bits are stored in planes where the head dim allows (a multiple of 64), the layout the
    CUDA decode kernel cuts into int8 registers (:mod:`pyramidkv.codecs.planes`); values stay a bit stream,
    which it reads through their product table."""
    if name == "fibquant":
        return FibQuant(head_dim, bits=bits, seed=seed)
    whole = _whole_bits(bits, name)
    if name == "turboquant":
        return TurboQuant(head_dim, whole, seed)
    planes = keys and whole == PLANE_BITS and head_dim % PLANE_ALIGN == 0
    return TurboQuant(
        head_dim, whole, seed, grid="uniform", layout="planes" if planes else "stream"
    )


def _whole_bits(bits: float, name: str) -> int:
    if float(bits) != int(bits):
        raise PyramidKVError(f"bits: {name} stores whole bits per coordinate (1-8), got {bits:g}")
    return int(bits)


@dataclass
class _Block:
    keys: Codes
    values: Codes
    tokens: int
    lengths: (
        torch.Tensor | None
    )  # (batch, kv_heads) for the ragged prompt block, else every slot is valid

    def visible(self, device: torch.device) -> torch.Tensor | None:
        """(batch, kv_heads, 1, tokens) bool, which slots of a ragged block hold a token; None when all do."""
        if self.lengths is None:
            return None
        slots = torch.arange(self.tokens, device=device)
        return (slots < self.lengths[..., None]).unsqueeze(-2)


def _join(first: Codes, then: Codes) -> Codes | None:
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
    ) -> None:
        """Encode (batch, kv_heads, s, dim) keys and values as one block; ``lengths`` marks ragged rows.

        ``fused``: encode in the Triton kernel (:func:`pyramidkv.kernels.fibquant_encode.fused_encode`).
        """
        if keys.shape[-2] == 0:
            return
        if fused:
            from .kernels.fibquant_encode import fused_encode

            codes_k, codes_v = (
                fused_encode(self.codecs.keys, keys),
                fused_encode(self.codecs.values, values),
            )
        else:
            codes_k, codes_v = self.codecs.keys.encode(keys), self.codecs.values.encode(values)
        self.append(codes_k, codes_v, keys.shape[-2], lengths)

    def append(
        self, keys: Codes, values: Codes, tokens: int, lengths: torch.Tensor | None = None
    ) -> None:
        """Add codes made elsewhere (e.g. rows of several caches stacked) as one block of ``tokens`` slots.

        Dense codes (every row holds every slot) that follow a dense block of per-token codes join it, so a
        layer holds at most two blocks however long it decodes: the ragged prompt and what was generated.
        Each block costs a kernel launch per decode step; the copy costs one pass over the generated codes
        per flush of the window.
        """
        last = self.blocks[-1] if self.blocks else None
        if lengths is None and last is not None and last.lengths is None:
            joined_keys, joined_values = _join(last.keys, keys), _join(last.values, values)
            if joined_keys is not None and joined_values is not None:
                self.blocks[-1] = _Block(joined_keys, joined_values, last.tokens + tokens, None)
                return
        self.blocks.append(_Block(keys, values, tokens, lengths))

    def reorder(self, rows: torch.Tensor, lengths: torch.Tensor | None) -> None:
        """Keep rows ``rows`` of every block, in that order (beam search); ``lengths``: the layer's reordered
        row lengths, which the ragged prompt block shares."""
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
                block.lengths = lengths

    @property
    def tokens(self) -> int:
        """Slots held in flushed blocks (every row has all of them)."""
        return sum(b.tokens for b in self.blocks if b.lengths is None)

    def chunks(
        self, q_len: int, dtype: torch.dtype
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Decoded (keys, values, visible) per block, for :func:`~pyramidkv.kernels.chunked_attention`."""
        for block in self.blocks:
            keys = self.codecs.keys.decode(block.keys, dtype)
            values = self.codecs.values.decode(block.values, dtype)
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
