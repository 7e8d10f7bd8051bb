"""The codec registry: codec specs (``"fibquant:2"``, ``"uniform/fibquant"``) and the key/value pair they name.

A cache stores keys and values through a :class:`CodecPair`; :func:`make_codecs` builds one for a model's
head dimension from what a user typed, and every error names the parameter (``codec`` or ``bits``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyramidkv.codecs.base import Codec
from pyramidkv.codecs.fibquant import FibQuant
from pyramidkv.codecs.kivi import KIVI
from pyramidkv.codecs.planes import ALIGN as PLANE_ALIGN
from pyramidkv.codecs.planes import BITS as PLANE_BITS
from pyramidkv.codecs.turboquant import TurboQuant
from pyramidkv.errors import PyramidKVError

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

    @property
    def bits(self) -> float:
        """The keys' rate in bits per coordinate (the rate a spec names)."""
        return _rate(self.keys)

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
    name, kb, vb = codec_rates(spec, bits, key_bits, value_bits)
    if name == "none":
        return None
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


def codec_rates(
    spec: str | None,
    bits: float | None = None,
    key_bits: float | None = None,
    value_bits: float | None = None,
) -> tuple[str, float | None, float | None]:
    """The codec a spec names and the rates of its keys and values, from the spec's ``:bits`` suffix, ``bits``
    and the per-side overrides: what can be checked before a model is known. A rate without a codec, or
    two different rates for the same thing, is an error."""
    name, suffix = parse_codec(spec)
    if name == "none":
        if any(b is not None for b in (bits, key_bits, value_bits)):
            raise PyramidKVError(
                "bits: a rate needs a codec (--codec fibquant, turboquant, uniform or kivi)"
            )
        return name, None, None
    if bits is not None and suffix is not None and float(bits) != suffix:
        raise PyramidKVError(
            f"bits: the codec {spec!r} sets {suffix:g} bits and bits={bits!r} another rate; "
            "give the rate once"
        )
    base = bits if bits is not None else suffix if suffix is not None else default_bits(name)
    return (
        name,
        key_bits if key_bits is not None else base,
        value_bits if value_bits is not None else base,
    )


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
