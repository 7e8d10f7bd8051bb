"""Greedy tokens and held bytes of a fixed list of cache configurations on the embedded model.

The question: does a change that should not alter behaviour (a restructuring, a new code path) leave every
configuration's output exactly as it was? The script runs each configuration of :func:`configurations` on
one real-text prompt (batch 1) and on two prompts of different lengths, left-padded (batch 2), greedy, and
writes the generated token ids and ``cache.nbytes()`` per configuration. ``tests/test_api_equivalence.py``
runs it again and compares with the committed ``benchmarks/results/api_equivalence_cpu.json``, which was
written on this repository's 2-core CPU (float32).

    python benchmarks/api_equivalence.py --out benchmarks/results/api_equivalence_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

POLICIES = ("pyramidkv", "snapkv", "h2o", "streamingllm")
BUDGETS = ("128", "10%")
CODECS = ("none", "fibquant:2", "turboquant:3", "kivi:2", "uniform/fibquant:2")
# new tokens per row, all generated (no early stop), so every decode path reads the compressed past
NEW_TOKENS = 16
# characters of corpus text per prompt: about 600 and 400 tokens, so a 128-token budget compresses both
PROMPT_CHARS = (2600, 1700)


def configurations() -> list[tuple[str, str, str]]:
    """(policy, budget, codec) of every run: the full cache, then each policy x budget x codec."""
    found = [("full", "128", "none")]
    found += [(p, b, c) for p in POLICIES for b in BUDGETS for c in CODECS]
    return found


def prompts() -> list[str]:
    """Two prompts of real text, the same paragraphs cut to two lengths, which the model continues."""
    from pyramidkv.eval.corpus import shuffled_paragraphs

    text = " ".join(shuffled_paragraphs(seed=7))
    return [text[:chars] for chars in PROMPT_CHARS]


def run(
    model, tokenizer, batch: int, chosen: list[tuple[str, str, str]] | None = None
) -> list[dict]:
    """Every configuration (or those ``chosen``) on the first ``batch`` prompts (left-padded when two)."""
    from pyramidkv import CompressedCache

    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts()[:batch], return_tensors="pt", padding=True).to(model.device)
    rows = []
    for policy, budget, codec in configurations() if chosen is None else chosen:
        with CompressedCache(model, policy=policy, budget=budget, codec=codec) as cache:
            with torch.inference_mode():
                out = model.generate(
                    **inputs,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    cache=cache,
                )
            rows.append(
                {
                    "policy": policy,
                    "budget": budget,
                    "codec": codec,
                    "batch": batch,
                    "prompt_tokens": int(inputs["input_ids"].shape[1]),
                    "tokens": out[:, inputs["input_ids"].shape[1] :].tolist(),
                    "nbytes": int(cache.nbytes()),
                }
            )
    return rows


def measure() -> list[dict]:
    from pyramidkv import load_model

    model, tokenizer = load_model(device="cpu", dtype=torch.float32)
    return run(model, tokenizer, 1) + run(model, tokenizer, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = measure()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"{len(rows)} configurations -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
