"""`make demo`: the main job on the embedded model, runnable on 2 CPU cores in a few minutes.

It answers a short question, then a question about a ~2,000-token document of real prose (the Python
Language Reference) with one fact hidden in its middle, and prints speed and KV-cache bytes for each.
"""

from __future__ import annotations

import random
import sys
import time

from rich.console import Console
from rich.table import Table

from .eval.corpus import shuffled_paragraphs
from .generation import GenerationResult, generate
from .models import load


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
    console = Console()
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
    rows: list[tuple[str, str, GenerationResult]] = []
    for label, prompt, expected in questions:
        console.print(f"\n[bold]{label}[/bold] (expected: {expected})")
        result = generate(
            model,
            tokenizer,
            prompt,
            max_new_tokens=32,
            on_text=lambda s: print(s, end="", flush=True),
        )
        print()
        rows.append((label, expected, result))

    table = Table(title="embedded model, full cache")
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
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
