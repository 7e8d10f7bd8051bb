"""How kept tokens are stored: FibQuant (vector), TurboQuant-mse (scalar) and KIVI-style int codecs.

Every codec has ``encode(x[..., d]) -> Codes``, ``decode(codes, dtype=None)``, ``codes.nbytes`` and
``bits_per_coordinate(include_norm)``. Pure tensor code: no transformers, CPU or CUDA (device of the input).
"""

from .base import Codec, Codes
from .fibquant import FibQuant, achievable_rates, choose_block
from .kivi import KIVI, GroupCodes
from .packing import pack_bits, packed_bytes, unpack_bits
from .rotated import RotatedBlockCodec, VectorCodes
from .rotation import haar_rotation
from .store import codebook_dir, load_codebook
from .turboquant import TurboQuant

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
