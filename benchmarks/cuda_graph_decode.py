"""Does a CUDA graph take the host out of a decode step? ms per step of the embedded model on long prompts:
eager through the dynamic caches, eager through a static-shape cache, and one captured CUDA graph replayed.

    PYTHONPATH=src python benchmarks/cuda_graph_decode.py      # GPU: 8k prompts, batch 1,8,32,128, full and pyramidkv 10%
    PYTHONPATH=src python benchmarks/cuda_graph_decode.py --configs fibquant,pyramidkv+fibquant --label codes
    PYTHONPATH=src python benchmarks/cuda_graph_decode.py --random --batches 1  # GPU: SmolLM2's shape, random weights
    python benchmarks/cuda_graph_decode.py --smoke             # CPU: tiny random llama, no graph, no timing claims

On the H200 a decode step of the embedded model took ~18 ms with the full cache and 26-30 ms with PyramidKV
at batch 1, about its cost at batch 128: the step is bound by host work, not by memory (issue 7). For every
cache and batch, one prefill (``--prefill-rows`` rows in one forward, repeated to the batch with
``batch_select_indices`` as benchmarks/generate_throughput.py does), then three decodes of ``--warmup`` +
``--steps`` greedy steps from the same first token, the last ``--steps`` timed between synchronisations:

* ``eager_dynamic`` — the existing cache (``DynamicCache`` for full, ``CompressedCache`` for the others)
  through model forward, as generate_throughput.py times it;
* ``eager_static`` — :class:`~pyramidkv.static.cache.StaticCompressedCache` built from that prefilled cache
  (the full cache too: one code path for both), stepped by :class:`~pyramidkv.static.cache.DecodeStep`;
* ``graph`` (CUDA only) — that step captured once as a ``torch.cuda.CUDAGraph`` after a warm-up on a side
  stream, replayed per step, the greedy token copied into the step's input buffer between replays.

Caches (``--configs``): ``full``, ``pyramidkv`` (at ``--budget``), and with FibQuant 2-bit codes and an fp16
window of ``--residual`` tokens ``fibquant`` (every token) and ``pyramidkv+fibquant``: their static copy
holds a store of codes and a ring of fp16 tokens (:mod:`pyramidkv.static.coded`). While warm-up and timed
steps fit in the window (35 <= 64 by default) no token leaves it, but every step encodes and writes one
slot all the same, so the time is that of any step.

The graph's greedy tokens must equal the eager static cache's over the timed steps: checked, and the script
exits with an error after saving when they do not. How often the static cache's tokens equal the dynamic
cache's is reported (in bf16 the two sum the attention in different orders, so a near-tie may flip).
Writes ``benchmarks/results/cuda_graph_decode.json`` (``--label x``: ``cuda_graph_decode_x.json``;
``--smoke``: the temp folder) after every row.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch
from transformers import DynamicCache

import machine  # sibling script
from generate_throughput import (  # sibling script
    corpus_rows,
    next_token,
    parse_batches,
    sync,
)
from pyramidkv.cache.accounting import cache_nbytes, kv_geometry
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.cache.protocol import decode_backends
from pyramidkv.static.cache import DecodeStep, StaticCompressedCache
from pyramidkv.static.graph import WARMUP, capture
from shapes import random_model  # sibling script

MODES = ("eager_dynamic", "eager_static", "graph")
CODEC = "fibquant:2"
CONFIGS = {  # name -> (policy, codec) of the CompressedCache; full without codes is a DynamicCache
    "full": ("full", None),
    "pyramidkv": ("pyramidkv", None),
    "fibquant": ("full", CODEC),
    "pyramidkv+fibquant": ("pyramidkv", CODEC),
    "turboquant": ("full", "turboquant:2"),  # TurboQuant's scalar codes, at FibQuant's rate
    # keys of a uniform grid (read as int8, no codebook), FibQuant values
    "uniform/fibquant": ("full", "uniform/fibquant:2"),
    # at 3 bits: FibQuant's, and keys of the uniform grid in planes (cut into int8 registers) with FibQuant values
    "fibquant:3": ("full", "fibquant:3"),
    "uniform/fibquant:3": ("full", "uniform/fibquant:3"),
}


def decode(advance, first: torch.Tensor, warmup: int, steps: int) -> tuple[float, torch.Tensor]:
    """ms per step of ``steps`` calls of ``advance(token) -> next token`` after ``warmup`` untimed ones, and
    the (warmup + steps, batch) greedy tokens, recorded on the device so the host never waits for them."""
    device = first.device
    tokens = torch.empty(warmup + steps, first.shape[0], dtype=torch.long, device=device)
    token = first
    for i in range(warmup):
        token = advance(token)
        tokens[i].copy_(token.view(-1))
    sync(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        token = advance(token)
        tokens[i].copy_(token.view(-1))
    sync(device)
    return (time.perf_counter() - start) / steps * 1e3, tokens.cpu()


def build_source(model, config: str, budget: str, residual: int):
    policy, codec = CONFIGS[config]
    if config == "full":
        return DynamicCache(config=model.config)
    return CompressedCache(model, policy, budget, codec=codec, residual=residual)


def _collect(device: torch.device) -> None:
    """Free the memory of caches just dropped, so the next decode starts from what it holds itself."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prefill(model, prompts: torch.Tensor, config: str, batch: int, args):
    """The source cache of ``batch`` rows (``--prefill-rows`` prefilled, then repeated) and its first tokens."""
    device, rows = model.device, min(batch, args.prefill_rows)
    source = build_source(model, config, args.budget, args.residual)
    first = next_token(model, source, prompts[:rows].to(device), logits_to_keep=1)
    if batch > rows:
        index = torch.arange(batch, device=device) % rows
        source.batch_select_indices(index)
        first = first[index]
    return source, first


def graph_decode(step: DecodeStep, static, first: torch.Tensor, warmup: int, steps: int) -> dict:
    """Capture the step, replay it ``warmup + steps`` times; a failure is recorded, not raised (the eager
    measurements of the row stand, and the GPU time spent on them is not lost)."""
    static.rewind(0)
    try:
        start = time.perf_counter()
        graph, _, output = capture(step, static, first)
        capture_s = time.perf_counter() - start

        def replay(token: torch.Tensor) -> torch.Tensor:
            step.input_ids.copy_(token)
            graph.replay()
            return output

        ms, tokens = decode(replay, first, warmup, steps)
    except RuntimeError as exc:
        traceback.print_exc()
        return {"graph_error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    return {"graph_ms": ms, "capture_s": capture_s, "graph_tokens": tokens}


def measure(model, prompts: torch.Tensor, config: str, batch: int, args) -> dict:
    """The three decodes of one cache and batch from one prefill (see the module docstring)."""
    device, warmup, steps = model.device, args.warmup, args.steps
    row: dict = {"config": config, "codec": CONFIGS[config][1], "batch": batch}
    row["prefill_rows"] = min(batch, args.prefill_rows)
    row.update(graph_ms=None, capture_s=None, graph_equals_static=None)
    timed = slice(warmup, None)
    with torch.inference_mode():
        source, first = prefill(model, prompts, config, batch, args)
        row["dynamic_bytes"] = cache_nbytes(source)
        static = StaticCompressedCache(model, source, max(warmup + steps, WARMUP + 1))
        # the SDPA backends generate_throughput.py gives every cache (no cuDNN planning per length)
        with decode_backends(device):
            ms, dynamic = decode(partial(next_token, model, source), first, warmup, steps)
        row["eager_dynamic_ms"] = ms
        if isinstance(source, CompressedCache):
            source.close()
        del source
        _collect(device)

        step = DecodeStep(model, static)

        def eager(token: torch.Tensor) -> torch.Tensor:
            step.input_ids.copy_(token)
            return step()[1]

        row["eager_static_ms"], eager_tokens = decode(eager, first, warmup, steps)
        row["static_bytes"] = static.nbytes()
        row["capacity"] = [layer.capacity for layer in static.layers]
        same = (eager_tokens[timed] == dynamic[timed]).float().mean().item()
        row["static_equals_dynamic"] = same
        if device.type == "cuda":
            row.update(graph_decode(step, static, first, warmup, steps))
        static.close()
    if "graph_tokens" in row:
        agree = (row.pop("graph_tokens")[timed] == eager_tokens[timed]).float().mean().item()
        row["graph_equals_static"], row["graph_static_agreement"] = agree == 1.0, agree
        row["graph_speedup_vs_eager_dynamic"] = row["eager_dynamic_ms"] / row["graph_ms"]
    for mode in MODES:
        ms = row[f"{mode}_ms"]
        row[f"{mode}_tokens_per_s"] = batch / ms * 1e3 if ms else None
    return row


def sweep(model, prompts, args, save) -> list[dict]:
    """Every cache over the batches; running out of memory ends a cache's sweep. ``save`` after every row."""
    rows = []
    for config in args.configs:
        for batch in args.batches:
            try:
                rows.append(measure(model, prompts, config, batch, args))
            except torch.cuda.OutOfMemoryError as exc:
                rows.append({"config": config, "batch": batch, "oom": str(exc).splitlines()[0]})
            _collect(
                model.device
            )  # here, once the except block has dropped the failed frame's tensors
            print(_line(rows[-1]), flush=True)
            save(rows)
            if "oom" in rows[-1]:
                break
    return rows


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _line(row: dict) -> str:
    if "oom" in row:
        return f"{row['config']} batch {row['batch']}: out of memory ({row['oom'][:80]})"
    times = ", ".join(f"{mode} {_ms(row[f'{mode}_ms'])}" for mode in MODES)
    check = {None: "no graph", True: "graph tokens = eager static", False: "GRAPH TOKENS DIFFER"}
    graph = f"graph failed: {row['graph_error']}" if "graph_error" in row else None
    return (
        f"{row['config']} batch {row['batch']}: ms/step {times}; "
        f"{graph or check[row['graph_equals_static']]}; "
        f"static = dynamic tokens {row['static_equals_dynamic']:.0%}"
    )


def print_table(rows: list[dict], title: str) -> None:
    header = ["config", "batch", "eager dynamic ms", "eager static ms", "graph ms"]
    header += ["graph tokens/s", "graph speedup", "graph = static", "static = dynamic"]
    cells = []
    for r in rows:
        if "oom" in r:
            cells.append([r["config"], r["batch"], "out of memory", *[""] * 6])
            continue
        speedup = r.get("graph_speedup_vs_eager_dynamic")
        tokens = r["graph_tokens_per_s"]
        check = {None: "-", True: "yes", False: "NO"}[r["graph_equals_static"]]
        cells.append([
            r["config"], r["batch"], *(_ms(r[f"{m}_ms"]) for m in MODES),
            "-" if tokens is None else f"{tokens:,.0f}", "-" if speedup is None else f"{speedup:.1f}x",
            "failed" if "graph_error" in r else check,
            f"{r['static_equals_dynamic']:.0%}",
        ])  # fmt: skip
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    print(f"\n{title}")
    for c in [header, ["-" * w for w in widths], *cells]:
        print("  ".join(str(v).rjust(w) for v, w in zip(c, widths, strict=True)))


def tiny_model():
    """A random-weight llama (4 layers, GQA 4/2): the CPU smoke run's model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # clear-cut greedy choices, so equal caches give equal tokens
        model.get_input_embeddings().weight.normal_(0, 1.0)
    return model


def result_path(stem: str, args: argparse.Namespace, label: str | None = None) -> Path:
    """Where a step benchmark writes its JSON: ``--out`` (a folder), else benchmarks/results, or the temp
    folder for ``--smoke``; ``stem`` with ``_label`` and ``_smoke`` appended. The folder is created."""
    folder = Path(
        args.out or (tempfile.gettempdir() if args.smoke else Path(__file__).parent / "results")
    )
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "".join(f"_{part}" for part in (label, "smoke" if args.smoke else None) if part)
    return folder / f"{stem}{suffix}.json"


def save_result(record: dict, path: Path) -> None:
    """Write a step benchmark's JSON record to ``path`` (from :func:`result_path`) and say where."""
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


def step_model(args: argparse.Namespace, rows: int):
    """The model a step benchmark runs, ``rows`` prompts of ``args.prompt`` tokens for it, the model's name and
    the prompts' source: the tiny random llama (``--smoke``) or SmolLM2's shape with random weights (``--random``,
    where a script has it) on random token ids, else ``--model`` (default: the embedded model) on prose."""
    if args.smoke or getattr(args, "random", False):
        model = tiny_model() if args.smoke else random_model("smollm2")
        name = "tiny random llama" if args.smoke else "SmolLM2-135M-shaped, random weights"
        generator = torch.Generator().manual_seed(0)
        prompts = torch.randint(
            3, model.config.vocab_size, (rows, args.prompt), generator=generator
        )
        return model, prompts, name, "random token ids"
    from pyramidkv.eval.corpus import source
    from pyramidkv.models import load

    model, tokenizer = load(args.model)
    name = model.config.name_or_path or args.model or "embedded"
    return model, corpus_rows(tokenizer, rows, args.prompt), name, source()


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", default=None, help="default: $PYRAMIDKV_MODEL, else the embedded model")
    add("--prompt", type=int, default=8000, help="prompt tokens per row")
    add("--batches", default="1,8,32,128")
    add("--configs", default="full,pyramidkv", help=f"comma-separated, of {', '.join(CONFIGS)}")
    add("--budget", default="10%", help="pyramidkv's average budget per layer")
    add("--residual", type=int, default=64, help="fp16 window of the caches with codes, tokens")
    add("--steps", type=int, default=32, help="timed decode steps")
    add("--warmup", type=int, default=3, help="untimed decode steps before them")
    add(
        "--prefill-rows", type=int, default=8, help="distinct rows prefilled, repeated to the batch"
    )
    add("--out", default=None, help="folder; default benchmarks/results (smoke: the temp folder)")
    add(
        "--label", default=None, help="suffix of the JSON file's name: cuda_graph_decode_LABEL.json"
    )
    add("--smoke", action="store_true", help="CPU check: tiny random llama, prompt 128, batch 1,2")
    add("--random", action="store_true", help="SmolLM2-shaped random weights (GPU), no model file")
    if parser.parse_known_args(argv)[
        0
    ].smoke:  # smoke sizes replace the defaults, not given options
        parser.set_defaults(prompt=128, batches="1,2", steps=3, warmup=1, prefill_rows=1)
    args = parser.parse_args(argv)
    for name in ("prompt", "steps", "prefill_rows", "warmup", "residual"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}; too small")
    if args.random and not torch.cuda.is_available():
        parser.error("--random: needs a CUDA device (use --smoke on a CPU)")
    args.batches = parse_batches(parser, args.batches)
    args.configs = args.configs.split(",")
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; expected some of {', '.join(CONFIGS)}")
    if args.label is not None and not args.label.replace("-", "").replace("_", "").isalnum():
        parser.error(f"--label: got {args.label!r}; expected letters, digits, - and _")
    return args


def main(argv=None) -> dict:
    args = arguments(argv)
    model, prompts, name, text = step_model(args, min(args.prefill_rows, args.batches[-1]))
    device, positions = model.device, model.config.max_position_embeddings
    if args.prompt + args.warmup + args.steps > positions:
        raise SystemExit(
            f"--prompt: {args.prompt} + {args.warmup} warm-up + {args.steps} steps is more than "
            f"the model's {positions} positions"
        )
    layers, kv_heads, head_dim = kv_geometry(model.config)
    question = "ms per decode step: eager dynamic caches, eager static cache, CUDA-graph replay"
    record = {
        **machine.header(question, "cuda_graph_decode.py", argv, device),
        "model": {
            "name": name,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "attention": model.config._attn_implementation,
            **dict(layers=layers, kv_heads=kv_heads, head_dim=head_dim),
        },
        "prompt": {"tokens": args.prompt, "source": text, "padding": "none"},
        "settings": vars(args),
        "graph": "torch.cuda.CUDAGraph per (cache, batch)" if device.type == "cuda" else None,
        "complete": False,
    }
    path = result_path("cuda_graph_decode", args, args.label)

    def save(rows: list[dict]) -> None:
        record["rows"] = rows
        path.write_text(json.dumps(record, indent=2) + "\n")

    rows = sweep(model, prompts, args, save)
    record["complete"] = True
    save(rows)
    dtype = record["model"]["dtype"]
    print_table(
        rows,
        f"{record['machine']['gpu'] or 'CPU'}, {name}, {dtype}, prompt {args.prompt}, {args.steps} steps",
    )
    print(f"wrote {path}")
    failed = [
        f"{r['config']} batch {r['batch']}: {r.get('graph_error', 'tokens differ from eager static')}"
        for r in rows
        if r.get("graph_equals_static") is False or "graph_error" in r
    ]
    if failed:
        raise SystemExit("graph check failed (results saved): " + "; ".join(failed))
    return record


if __name__ == "__main__":
    main()
