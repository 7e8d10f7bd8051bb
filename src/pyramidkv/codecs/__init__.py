"""How kept tokens are stored: FibQuant (vector), TurboQuant-mse (scalar) and KIVI-style int codecs.

Every codec has ``encode(x[..., d]) -> Codes``, ``decode(codes, dtype=None)``, ``codes.nbytes`` and
``bits_per_coordinate(include_norm)``. Pure tensor code: no transformers, CPU or CUDA (device of the input).
"""

from pyramidkv.codecs.base import Codec, Codes
from pyramidkv.codecs.fibquant import FibQuant, achievable_rates, choose_block
from pyramidkv.codecs.kivi import KIVI, GroupCodes
from pyramidkv.codecs.packing import pack_bits, packed_bytes, unpack_bits
from pyramidkv.codecs.rotated import RotatedBlockCodec, VectorCodes
from pyramidkv.codecs.rotation import haar_rotation
from pyramidkv.codecs.store import codebook_dir, load_codebook
from pyramidkv.codecs.turboquant import TurboQuant

__all__ = [
    "KIVI",
    "Codec",
    "Codes",
    "FibQuant",
    "GroupCodes",
    "RotatedBlockCodec",
    "TurboQuant",
    "VectorCodes",
    "achievable_rates",
    "choose_block",
    "codebook_dir",
    "haar_rotation",
    "load_codebook",
    "pack_bits",
    "packed_bytes",
    "unpack_bits",
]
