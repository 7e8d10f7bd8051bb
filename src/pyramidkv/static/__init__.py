"""The CUDA-graph path: a static-shape copy of a prefilled cache, its layers, and the captured decode step."""

from pyramidkv.static.buffers import StaticBufferLayer
from pyramidkv.static.cache import DecodeStep, StaticCompressedCache
from pyramidkv.static.coded import StaticCodedLayer

__all__ = ["DecodeStep", "StaticBufferLayer", "StaticCodedLayer", "StaticCompressedCache"]
