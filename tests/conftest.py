"""Shared fixtures: tiny random-weight models built from configs (llama, qwen2, qwen3; GQA and MHA).

They run in milliseconds on a CPU, so the unit tests exercise the real transformers code paths without a
download. Tests marked ``slow`` load the embedded SmolLM2 model (converted once, then read from the cache).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's interpreter. The variable must be set before anything
# imports triton (transformers and torch may, lazily), so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def make_tiny(family: str = "llama", seed: int = 0, **overrides):
    """A random-weight causal LM of ``family`` (llama, qwen2 or qwen3), float32 on the CPU, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **{**TINY, **overrides})
    # SDPA where the family offers it (Gemma 2's soft-capping and gpt-oss's sinks need eager attention)
    config._attn_implementation = "eager" if family in ("gemma2", "gpt_oss") else "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform logits; a larger embedding scale makes greedy choices clear-cut, so a
    # one-ulp difference between two correct attention paths cannot flip an argmax.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def tiny_model(request):
    return make_tiny(request.param)


@pytest.fixture
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct with its tokenizer (float32, CPU)."""
    from pyramidkv.models import load

    return load(device="cpu")


def load_benchmark(script: str):
    """``benchmarks/<script>.py`` imported as the module ``<script>_bench``, with ``benchmarks/`` on the path
    (the scripts import their siblings) and the module registered in ``sys.modules`` (a script's dataclasses
    look their module up there)."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{script}.py"
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"{script}_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
