"""The `pyramidkv` command line. It only calls the public API; every user error is one line and exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from pyramidkv import __version__
from pyramidkv.cli import evaluate, measure
from pyramidkv.errors import PyramidKVError

app = typer.Typer(
    help="Compress the KV cache of Hugging Face transformers models, and measure what it costs.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pyramidkv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """pyramidkv: PyramidKV eviction and FibQuant quantization of the KV cache."""


def _read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise PyramidKVError(
            "prompt: give the prompt as an argument or with --prompt-file, not both"
        )
    if prompt_file is None:
        return prompt or ""
    if prompt_file == "-":
        return sys.stdin.read()
    path = Path(prompt_file)
    if not path.is_file():
        raise PyramidKVError(f"--prompt-file: no such file: {prompt_file!r}")
    return path.read_text(encoding="utf-8")


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="A .gguf file, a model folder or a Hugging Face id [default: embedded SmolLM2]",
    ),
]


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="The prompt text.")] = None,
    prompt_file: Annotated[
        str | None,
        typer.Option("--prompt-file", "-f", help="Read the prompt from this file ('-' for stdin)."),
    ] = None,
    model: ModelOption = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate (>= 1).")] = 128,
    chat: Annotated[
        bool, typer.Option("--chat/--no-chat", help="Wrap the prompt in the chat template.")
    ] = True,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1 ... [default: cuda if available]")
    ] = None,
    policy: Annotated[
        str,
        typer.Option(
            help="Eviction policy: full, pyramidkv, snapkv, h2o, streamingllm, key-norm, random."
        ),
    ] = "full",
    budget: Annotated[
        str,
        typer.Option(
            help="Tokens kept per layer on average ('128') or a share of the prompt ('10%')."
        ),
    ] = "128",
    codec: Annotated[
        str,
        typer.Option(
            help="Store kept tokens as codes: none, fibquant, turboquant, uniform, kivi, or keys/values "
            "such as uniform/fibquant (optionally name:bits)."
        ),
    ] = "none",
    bits: Annotated[
        float | None, typer.Option(help="Bits per coordinate of the codec (FibQuant: 0.5-4).")
    ] = None,
    kv_memory: Annotated[
        str | None,
        typer.Option(
            help="KV memory instead of --budget: '48MiB' or a share of the full cache '5%'."
        ),
    ] = None,
    kernel: Annotated[
        str,
        typer.Option(help="Attention over codes: auto (fused kernels on CUDA), torch or triton."),
    ] = "auto",
    cuda_graph: Annotated[
        bool,
        typer.Option(
            "--cuda-graph",
            help="Decode greedily by replaying one captured CUDA graph step over a static cache.",
        ),
    ] = False,
) -> None:
    """Stream the model's answer to PROMPT, then print tokens/s and the KV-cache size in bytes."""
    from pyramidkv.budgets import parse_budget, parse_memory
    from pyramidkv.cache.compressed import CompressedCache
    from pyramidkv.codecs.registry import parse_codec
    from pyramidkv.generation import generate as run
    from pyramidkv.kernels.dispatch import check_kernel_name
    from pyramidkv.models import load
    from pyramidkv.policies import get_policy

    compress = get_policy(policy).name != "full" or parse_codec(codec)[0] != "none"
    check_kernel_name(kernel, parse_codec(codec)[0], "--kernel")  # before the model loads
    parse_budget(budget)
    if kv_memory is not None:
        parse_memory(kv_memory)

    text = _read_prompt(prompt, prompt_file)
    if not text.strip():
        raise PyramidKVError(
            "prompt: the prompt is empty; give some text (or --prompt-file with text in it)"
        )
    if max_new_tokens < 1:
        raise PyramidKVError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    lm, tokenizer = load(model, device=device)
    cache = None
    if compress:
        cache = CompressedCache(
            lm,
            policy=policy,
            budget=budget,
            codec=codec,
            bits=bits,
            kv_memory=kv_memory,
            kernel=kernel,
        )

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = run(
        lm, tokenizer, text, max_new_tokens=max_new_tokens, chat=chat, cache=cache, on_text=show,
        cuda_graph=cuda_graph,
    )  # fmt: skip
    sys.stdout.write("\n")
    typer.echo(
        f"[prompt {result.prompt_tokens} tokens, {result.prefill_tokens_per_s:.1f} tok/s | "
        f"generated {result.new_tokens} tokens, {result.decode_tokens_per_s:.1f} tok/s | "
        f"KV cache {result.kv_bytes:,} bytes]",
        err=True,
    )
    if cache is not None:
        held = result.held_tokens
        typer.echo(
            f"[{policy} {'kv-memory ' + kv_memory if kv_memory else 'budget ' + budget}, codec "
            f"{cache.codecs.label() if cache.codecs else 'none'}: {held:.1f} tokens per layer and head on average, "
            f"{result.kv_bytes:,} bytes vs {result.full_kv_bytes:,} for the full cache "
            f"({result.full_kv_bytes / max(result.kv_bytes, 1):.1f}x smaller)]",
            err=True,
        )
        cache.close()


app.command("eval")(evaluate.eval_command)
app.command("report")(evaluate.report_command)
app.command("perplexity")(measure.perplexity_command)
app.command("fidelity")(measure.fidelity_command)
app.command("funnel")(measure.funnel_command)

codebook_app = typer.Typer(
    help="Build or inspect FibQuant codebooks (cached on disk).", no_args_is_help=True
)
app.add_typer(codebook_app, name="codebook")


def _describe(d: int, k: int | None, n: int | None, bits: float | None, seed: int) -> None:
    from pyramidkv.codecs import FibQuant
    from pyramidkv.codecs.describe import describe_codebook

    try:
        codec = FibQuant(d, k, n, bits=bits, seed=seed)
    except (TypeError, ValueError) as exc:
        raise PyramidKVError(str(exc)) from exc
    info = describe_codebook(d, codec.k, codec.n, seed)
    width = max(map(len, info))
    for key, value in info.items():
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        typer.echo(f"{key:<{width}}  {shown}")


CodebookD = Annotated[int, typer.Option("--d", help="Vector dimension (head dim).")]
CodebookK = Annotated[int | None, typer.Option("--k", help="Coordinates per block (1-8).")]
CodebookN = Annotated[int | None, typer.Option("--n", help="Codewords in the codebook.")]
CodebookBits = Annotated[float | None, typer.Option("--bits", help="Rate in bits per coordinate.")]
CodebookSeed = Annotated[int, typer.Option(help="Seed of the rotation and codebook.")]


def codebook_describe(
    d: CodebookD = 64,
    k: CodebookK = None,
    n: CodebookN = None,
    bits: CodebookBits = 2.0,
    seed: CodebookSeed = 0,
) -> None:
    """Build a codebook (or read it from the cache) and print its size, rate and distortion."""
    _describe(d, k, n, None if (k and n) else bits, seed)


codebook_app.command("build")(codebook_describe)
codebook_app.command(
    "show",
    help="Print a codebook's size, rate, MSE, and TurboQuant's and Shannon's figures at that rate.",
)(codebook_describe)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        app()
    except PyramidKVError as exc:
        typer.echo(f"pyramidkv: error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
