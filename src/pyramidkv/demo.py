"""`make demo`: the main job on the embedded model, runnable on 2 CPU cores in about five minutes.

1. A short question and a question about a ~2,000-token document of real prose with one fact hidden in
   it, with the full cache, PyramidKV at 10% of the tokens (evicted, and as FibQuant 2-bit codes), a fixed
   SnapKV + FibQuant 3-bit cache at 3% of the full cache's bytes, and the memory planner at the same 3%
   (:mod:`pyramidkv.cache.planner`): the answers, KV bytes, and decode speed timed over 64 new tokens.
2. A passkey retrieval comparison (5 depths, 1k and 2k tokens) of the full cache, PyramidKV and SnapKV
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
TIMED_TOKENS = 64  # decode speed is timed over this many new tokens, stop tokens suppressed


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
        (f"2k doc, {label}", *document_question, options)
        for label, options in (
            ("pyramidkv 10%", {"policy": "pyramidkv", "budget": "10%"}),
            ("pyramidkv 10% + fibquant 2-bit", {"policy": "pyramidkv", "budget": "10%", "codec": "fibquant:2"}),
            ("fibquant 3-bit, 3% of bytes", {"policy": "snapkv", "kv_memory": "3%", "codec": "fibquant:3"}),
            ("planner, 3% of bytes", {"policy": "snapkv", "kv_memory": "3%", "plan": "auto"}),
        )
    ]  # fmt: skip
    rows: list[tuple[str, str, GenerationResult, float]] = []
    for label, prompt, expected, *options in questions:
        console.print(f"\n[bold]{label}[/bold] (expected: {expected})")
        answer = _generate(model, tokenizer, prompt, options, echo=True)
        print()
        timed = _generate(model, tokenizer, prompt, options, min_new_tokens=TIMED_TOKENS)
        rows.append((label, expected, answer, timed.decode_tokens_per_s))

    table = Table(
        title=f"embedded model: one fact in a document (decode timed over {TIMED_TOKENS} tokens)"
    )
    for column in (
        "task",
        "prompt tok",
        "prefill tok/s",
        "decode tok/s",
        "KV bytes",
        "of full",
        "correct",
    ):
        table.add_column(column, justify="right" if column != "task" else "left")
    for label, expected, r, decode in rows:
        table.add_row(
            label,
            str(r.prompt_tokens),
            f"{r.prefill_tokens_per_s:.0f}",
            f"{decode:.1f}",
            f"{r.kv_bytes:,}",
            f"{r.kv_bytes / r.full_kv_bytes:.1%}",
            "yes" if expected in r.text else "no",
        )
    console.print(table)
    needle_comparison(model, tokenizer, console)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    sys.stdout.flush()


def _generate(
    model, tokenizer, prompt: str, options: list[dict], echo: bool = False, min_new_tokens: int = 0
) -> GenerationResult:
    """One greedy answer (up to 32 tokens, or exactly ``min_new_tokens`` when timing) with a fresh cache of
    ``options`` (the full cache when empty)."""
    cache = CompressedCache(model, **options[0]) if options else None
    try:
        return generate(
            model,
            tokenizer,
            prompt,
            max_new_tokens=max(32, min_new_tokens),
            min_new_tokens=min_new_tokens,
            cache=cache,
            on_text=(lambda s: print(s, end="", flush=True)) if echo else None,
        )
    finally:
        if cache is not None:
            cache.close()


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
