"""The dynamic compressed cache: its layers, their coded blocks, the attention hook and the byte accounting."""

from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.cache.layers import CodedLayer, CompressedLayer
from pyramidkv.cache.protocol import CacheLayer, ModelAttention
from pyramidkv.cache.selection import Selection

__all__ = [
    "CacheLayer",
    "CodedLayer",
    "CompressedCache",
    "CompressedLayer",
    "ModelAttention",
    "Selection",
]
