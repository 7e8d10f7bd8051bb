"""pyramidkv: compress the KV cache of Hugging Face transformers models.

The public API, importable from the top level::

    from pyramidkv import CompressedCache, load_model, generate

Names load on first use (PEP 562), so ``import pyramidkv`` and ``pyramidkv --version`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CompressedCache": "pyramidkv.cache.compressed",
    "StaticCompressedCache": "pyramidkv.static.cache",
    "DecodeStep": "pyramidkv.static.cache",
    "Policy": "pyramidkv.policies.presets",
    "get_policy": "pyramidkv.policies.presets",
    "POLICY_NAMES": "pyramidkv.policies.presets",
    "CodecPair": "pyramidkv.codecs.registry",
    "make_codecs": "pyramidkv.codecs.registry",
    "Budget": "pyramidkv.budgets",
    "parse_budget": "pyramidkv.budgets",
    "generate": "pyramidkv.generation",
    "GenerationResult": "pyramidkv.generation",
    "PyramidKVError": "pyramidkv.errors",
}
_RENAMED = {"load_model": ("pyramidkv.models", "load")}

__all__ = [
    "POLICY_NAMES",
    "Budget",
    "CodecPair",
    "CompressedCache",
    "DecodeStep",
    "GenerationResult",
    "Policy",
    "PyramidKVError",
    "StaticCompressedCache",
    "__version__",
    "generate",
    "get_policy",
    "load_model",
    "make_codecs",
    "parse_budget",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _RENAMED:
        module, attribute = _RENAMED[name]
        value = getattr(importlib.import_module(module), attribute)
    else:
        raise AttributeError(f"module 'pyramidkv' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from pyramidkv.budgets import Budget, parse_budget
    from pyramidkv.cache.compressed import CompressedCache
    from pyramidkv.codecs.registry import CodecPair, make_codecs
    from pyramidkv.errors import PyramidKVError
    from pyramidkv.generation import GenerationResult, generate
    from pyramidkv.models import load as load_model
    from pyramidkv.policies.presets import POLICY_NAMES, Policy, get_policy
    from pyramidkv.static.cache import DecodeStep, StaticCompressedCache
