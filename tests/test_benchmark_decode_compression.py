"""``benchmarks/decode_compression.py``: prompts teacher-forced together give each prompt's own figures.

The batched run must equal running every prompt alone (each row keeps its own selection), and a decode budget
that covers the whole generation must give the full cache's logits (KL ~ 0, top-1 agreement 1).
"""

from __future__ import annotations

import torch

from .conftest import load_benchmark, make_tiny

bench = load_benchmark("decode_compression")


def sharp_model():
    """A tiny llama whose query and key weights are scaled up, so attention is peaked and eviction shows."""
    model = make_tiny("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def test_rows_together_equal_each_row_alone():
    model = sharp_model()
    torch.manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (3, 40))
    generated = torch.randint(3, model.config.vocab_size, (3, 33))
    options = bench.parse_config("snapkv/24/8")
    together = bench.run_config(model, prompts, generated, options)
    for row, found in enumerate(together):
        alone = bench.run_config(model, prompts[row : row + 1], generated[row : row + 1], options)[
            0
        ]
        torch.testing.assert_close(
            torch.tensor(found["kl"]), torch.tensor(alone["kl"]), atol=1e-5, rtol=0
        )
        assert found["top1"] == alone["top1"]
        assert found["held"] == alone["held"]
    assert (
        max(max(f["kl"]) for f in together) > 1e-7
    )  # the budget binds (a covering budget gives < 1e-9)


def test_a_budget_covering_the_generation_is_the_full_cache():
    model = sharp_model()
    torch.manual_seed(1)
    prompts = torch.randint(3, model.config.vocab_size, (2, 20))
    generated = torch.randint(3, model.config.vocab_size, (2, 17))
    found = bench.run_config(model, prompts, generated, bench.parse_config("snapkv/64/8"))
    for row in found:
        assert max(row["kl"]) < 1e-9 and min(row["top1"]) == 1.0
        assert [n for n, _ in row["held"]] == list(range(2, 17, 2))
