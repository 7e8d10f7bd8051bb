"""`make demo`: the main job on the embedded model, runnable on 2 CPU cores in about five minutes.

1. A short question and a question about a ~2,000-token document of real prose with one fact hidden in
   it, with the full cache: speed and KV bytes.
2. The same document question with PyramidKV at 10% of the tokens, and with PyramidKV + FibQuant 2-bit.
3. A passkey retrieval comparison (5 depths, 1k and 2k tokens) of the full cache, PyramidKV and SnapKV
   at 128 tokens per layer, and PyramidKV + FibQuant 2-bit at the same bytes as 128 fp16 tokens
   (910 tokens): a table and a depth x length heatmap PNG in ``results/demo/``.
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.eval.corpus import shuffled_paragraphs
from pyramidkv.generation import GenerationResult, generate
from pyramidkv.models import load

DEMO_OUT = Path("results/demo")


def document_with_fact(tokenizer, tokens: int, fact: str, seed: int = 0) -> str:
    """Paragraphs of real prose up to about ``tokens`` tokens, with ``fact`` inserted halfway."""
    kept, total = [], 0
    for paragraph in shuffled_paragraphs(seed):
        kept.append(paragraph)
        total += len(tokenizer(paragraph)["input_ids"]) + 1
        if total >= tokens:
            break
    kept.insert(len(kept) // 2, fact)
    return "\n\n".join(kept)


def main() -> None:
    console = Console(width=120)
    started = time.perf_counter()
    console.print("[bold]pyramidkv demo[/bold]: loading the embedded SmolLM2-135M-Instruct ...")
    t = time.perf_counter()
    model, tokenizer = load()
    console.print(f"loaded in {time.perf_counter() - t:.1f} s on {model.device}")

    code = random.Random(7).randint(10_000, 99_999)
    document = document_with_fact(
        tokenizer, 2000, f"The access code for the archive room is {code}."
    )
    questions = [
        ("short question", "What is the capital of France?", "Paris"),
        (
            "2k-token document",
            f"{document}\n\nWhat is the access code for the archive room? Answer with the number only.",
            str(code),
        ),
    ]
    document_question = questions[1][1:]
    questions += [
        ("2k doc, pyramidkv 10%", *document_question, {"policy": "pyramidkv", "budget": "10%"}),
        (
            "2k doc, pyramidkv 10% + fibquant 2-bit",
            *document_question,
            {"policy": "pyramidkv", "budget": "10%", "codec": "fibquant:2"},
        ),
    ]
    rows: list[tuple[str, str, GenerationResult]] = []
    for label, prompt, expected, *options in questions:
        console.print(f"\n[bold]{label}[/bold] (expected: {expected})")
        cache = CompressedCache(model, **options[0]) if options else None
        result = generate(
            model,
            tokenizer,
            prompt,
            max_new_tokens=32,
            cache=cache,
            on_text=lambda s: print(s, end="", flush=True),
        )
        if cache is not None:
            cache.close()
        print()
        rows.append((label, expected, result))

    table = Table(title="embedded model: one fact in a document")
    for column in ("task", "prompt tok", "prefill tok/s", "decode tok/s", "KV bytes", "correct"):
        table.add_column(column, justify="right" if column != "task" else "left")
    for label, expected, r in rows:
        table.add_row(
            label,
            str(r.prompt_tokens),
            f"{r.prefill_tokens_per_s:.0f}",
            f"{r.decode_tokens_per_s:.1f}",
            f"{r.kv_bytes:,}",
            "yes" if expected in r.text else "no",
        )
    console.print(table)
    needle_comparison(model, tokenizer, console)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    sys.stdout.flush()


def needle_comparison(model, tokenizer, console: Console) -> None:
    """Full, PyramidKV, SnapKV and PyramidKV + FibQuant on passkeys at 5 depths, through the eval harness.

    910 FibQuant 2-bit tokens (2.25 bits per coordinate with the norm) take the bytes of 128 fp16 tokens.
    """
    from pyramidkv.eval.runner import Config
    from pyramidkv.eval.sweep import EvalOptions, run_eval

    console.print("\n[bold]passkey retrieval[/bold] (5 depths, question inside the prompt)")
    shutil.rmtree(DEMO_OUT, ignore_errors=True)  # the showcase is measured afresh on every run
    options = EvalOptions("passkey", lengths="1k,2k", samples=10, out=DEMO_OUT, mode="query-aware")
    options.configs = [
        Config("full"),
        Config("pyramidkv", "128"),
        Config("snapkv", "128"),
        Config("pyramidkv", "910", "fibquant:2"),
    ]
    run_eval(model, tokenizer, options, "embedded SmolLM2-135M-Instruct", console)


if __name__ == "__main__":
    main()
