"""Random-weight models of real architectures, for GPU timings that need no model file.

A prefill's or a decode step's kernels and their times depend on the model's shapes, not on its weights, so
timings of SmolLM2-135M or Llama-3-8B are taken on random weights of their shapes (quality needs the real
model). The weights are created on the target device in the target dtype, so an 8B shape never passes
through 32 GB of float32 on the host.
"""

from __future__ import annotations

import torch

# transformers LlamaConfig arguments of each shape
SHAPES: dict[str, dict] = {
    # SmolLM2-135M-Instruct, the embedded model
    "smollm2": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True,
    ),
    # Llama-3-8B: 32 layers, 32 query and 8 KV heads of 128, hidden 4096
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0,
    ),
}  # fmt: skip

NAMES = {
    "smollm2": "SmolLM2-135M-shaped, random weights",
    "llama3-8b": "Llama-3-8B-shaped, random weights",
}


def random_model(
    shape: str,
    device: str | torch.device = "cuda",
    dtype=torch.bfloat16,
    positions: int | None = None,
):
    """A ``LlamaForCausalLM`` of ``shape`` (a key of :data:`SHAPES`) with seeded random weights, in eval mode.

    ``positions``: stretch the context to this many positions by linear RoPE scaling (position interpolation,
    Chen et al. 2023), as long-context variants of these models do; None keeps the shape's own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise SystemExit(f"shape: got {shape!r}; expected one of {', '.join(SHAPES)}")
    options = dict(SHAPES[shape])
    native = options["max_position_embeddings"]
    if positions is not None and positions > native:
        options["max_position_embeddings"] = positions
        options["rope_scaling"] = {"rope_type": "linear", "factor": positions / native}
    config = LlamaConfig(**options)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()
