"""How many sequences does a compressed cache serve, and how fast? Decode throughput of the embedded model on
long prompts with the full bf16 cache, PyramidKV at 10%, FibQuant 2-bit and both; then, for a fixed KV
memory (16 GiB), the largest batch each cache fits and the decode tokens/s it reaches there.

    PYTHONPATH=src python benchmarks/generate_throughput.py      # GPU defaults, sized for ~5 minutes
    python benchmarks/generate_throughput.py --smoke             # CPU check: prompt 256, batch 1 and 2

Every row of a batch is a distinct window of real prose (``pyramidkv.eval.corpus``), all of one length, no
padding; the prompt is 8,000 tokens by default because the model has 8,192 positions and the warm-up and
timed steps follow it. Up to ``--prefill-rows`` rows are prefilled in one forward (a ``CompressedCache``
compresses its first forward); a larger batch repeats those rows' cache (`Cache.batch_select_indices`), the
cache one forward over the repeated prompts gives. Decode is a manual greedy loop timed between CUDA
synchronisations after ``--warmup`` steps: ms per step, tokens/s = batch / step time, peak memory of
prefill and of decode (each after a reset) and the bytes the cache holds at the end. Running out of GPU
memory ends a cache's sweep. Fixed KV memory: bytes per row = (cache bytes - shared codebooks) / batch at
the largest batch measured; the largest batch that fits ``--kv-memory`` is then run. ``step_floor`` is a
16-token prompt at batch 1: the per-step cost that is not the cache. Writes
``benchmarks/results/generate_throughput_<device>.json`` and prints two tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch
from transformers import DynamicCache

import machine  # sibling script
from pyramidkv.budgets import parse_memory
from pyramidkv.cache.accounting import cache_nbytes, kv_geometry
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.cache.protocol import decode_backends
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.corpus import shuffled_paragraphs, source
from pyramidkv.kernels import cuda_decode, use_fused
from pyramidkv.models import load
from pyramidkv.static.cache import DecodeStep, StaticCompressedCache
from pyramidkv.static.graph import WARMUP, capture

GiB = 2**30


@dataclass(frozen=True)
class CacheSpec:
    """One cache of the sweep: an eviction ``policy`` (``None`` keeps every token) and a ``codec``."""

    key: str
    label: str
    policy: str | None = None
    budget: str | None = None  # tokens kept per layer (PyramidKV's average), when a policy evicts
    codec: str | None = None
    kv_memory: str | None = (
        None  # the planner's byte budget (``plan="auto"``), instead of ``budget``
    )

    def build(self, model, kernel: str):
        if self.policy is None and self.codec is None:
            return DynamicCache(config=model.config)
        if self.kv_memory is not None:
            return CompressedCache(
                model, self.policy, kv_memory=self.kv_memory, plan="auto", kernel=kernel
            )
        if self.policy is None:
            return CompressedCache(model, "full", codec=self.codec, kernel=kernel)
        return CompressedCache(model, self.policy, self.budget, codec=self.codec, kernel=kernel)


def specs(budget: str, codec: str, plan_memory: str = "3%") -> dict[str, CacheSpec]:
    both = CacheSpec(
        "pyramidkv+fibquant", f"pyramidkv {budget} + {codec}", "pyramidkv", budget, codec
    )
    planned = CacheSpec(
        "plan", f"planned {plan_memory} of the bytes", "pyramidkv", kv_memory=plan_memory
    )
    return {
        "full": CacheSpec("full", "full (DynamicCache)"),
        "pyramidkv": CacheSpec("pyramidkv", f"pyramidkv {budget}", "pyramidkv", budget),
        "fibquant": CacheSpec("fibquant", codec, codec=codec),
        both.key: both,
        planned.key: planned,
    }


def kernel_used(cache, device: torch.device) -> str:
    """Decode attention on codes: the CUDA mma kernel, the Triton kernel or the torch reference (a one-token
    step of a model with at most 16 query heads per KV head); without codes, the model's SDPA."""
    if not isinstance(cache, CompressedCache) or cache.codecs is None:
        return "sdpa" if isinstance(cache, DynamicCache) else "sdpa (kept + recent)"
    if not use_fused(cache.kernel, cache.fused_ok, device):
        return "torch"
    keys, values = cache.codecs.keys, cache.codecs.values
    return "cuda mma" if cuda_decode.usable(keys, values, keys.d, 1, device) else "triton"


def corpus_rows(tokenizer, rows: int, length: int) -> torch.Tensor:
    """(rows, length) token ids: windows of the prose corpus at evenly spaced starts, all distinct."""
    ids = tokenizer(" ".join(shuffled_paragraphs(0)), return_tensors="pt")["input_ids"][0]
    if ids.numel() < length + rows - 1:
        raise ValueError(f"prompt: {length} tokens x {rows} rows; the corpus has {ids.numel()}")
    stride = max(1, (ids.numel() - length) // max(rows - 1, 1))
    return torch.stack([ids[i * stride : i * stride + length] for i in range(rows)])


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device, reset: bool = False) -> int | None:
    """Peak bytes allocated on a CUDA device since the last reset (None on the CPU); ``reset`` starts anew."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


class PrefillOutOfMemory(Exception):
    """The prefill forward did not fit; fewer rows per forward may."""


def measure(
    model, prompts, spec, batch, *, kernel, steps, warmup, prefill_rows, graph=False
) -> dict:
    """Prefill ``min(batch, prefill_rows)`` rows in one forward, repeat them to ``batch``, time greedy decode
    (``graph``: by replays of one captured step over a static copy of the cache, :func:`graph_steps`)."""
    device, rows = model.device, min(batch, prefill_rows)
    cache = spec.build(model, kernel)
    try:
        with torch.inference_mode():
            ids = prompts[:rows].to(device)
            sync(device)
            _peak(device, reset=True)
            start = time.perf_counter()
            try:
                token = next_token(model, cache, ids, logits_to_keep=1)
            except torch.cuda.OutOfMemoryError as exc:
                raise PrefillOutOfMemory(str(exc).splitlines()[0]) from None
            sync(device)
            prefill_s = time.perf_counter() - start
            prefill_peak = _peak(device, reset=True)
            if batch > rows:
                index = torch.arange(batch, device=device) % rows
                cache.batch_select_indices(index)
                token = token[index]
                _peak(device, reset=True)  # the decode peak starts after the repetition
            used = kernel_used(cache, device)
            shared = cache.codebook_nbytes() if isinstance(cache, CompressedCache) else 0
            # every cache decodes with the SDPA backends pyramidkv's decode path uses (no cuDNN: it plans
            # per key length), so the full cache's baseline pays no per-shape cost either
            with decode_backends(device):
                if graph:
                    static = StaticCompressedCache(model, cache, warmup + steps + WARMUP)
                    if isinstance(cache, CompressedCache):
                        cache.close()  # the static copy holds the past now and routes attention itself
                    cache = static
                    decode_s = graph_steps(model, cache, token, warmup, steps)
                else:
                    for _ in range(warmup):
                        token = next_token(model, cache, token)
                    sync(device)
                    start = time.perf_counter()
                    for _ in range(steps):
                        token = next_token(model, cache, token)
                    sync(device)
                    decode_s = time.perf_counter() - start
        held = cache_nbytes(cache)  # a static copy: every preallocated slot
    finally:
        if isinstance(cache, CompressedCache | StaticCompressedCache):
            cache.close()
    return {
        "config": spec.key,
        "kernel": f"{used}, graph" if graph else used,
        "batch": batch,
        "prefill_rows": rows,
        "prefill_s": prefill_s,
        "ms_per_step": decode_s / steps * 1e3,
        "tokens_per_s": batch * steps / decode_s,
        "cache_bytes": held,
        "shared_bytes": shared,
        "bytes_per_row": (held - shared) / batch,
        "prefill_peak_bytes": prefill_peak,
        "decode_peak_bytes": _peak(device),
    }


def graph_steps(
    model, static: StaticCompressedCache, token: torch.Tensor, warmup: int, steps: int
) -> float:
    """Seconds of ``steps`` greedy steps, each one replay of the step captured over ``static``, after
    ``warmup`` replays; the greedy token is copied into the step's input on the device between replays."""
    step = DecodeStep(model, static)
    graph, _, output = capture(step, static, token)
    step.input_ids.copy_(token)
    for _ in range(warmup):
        graph.replay()
        step.input_ids.copy_(output)
    sync(model.device)
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
        step.input_ids.copy_(output)
    sync(model.device)
    return time.perf_counter() - start


def next_token(model, cache, ids: torch.Tensor, **options) -> torch.Tensor:
    """One forward with the cache; the greedy next token of every row, (batch, 1)."""
    logits = model(input_ids=ids, **cache_kwargs(model, cache), **options).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def attempt(model, prompts, spec, batch, settings: dict) -> dict:
    """:func:`measure`, halving the rows per prefill forward when it runs out of memory; OOM is a result."""
    while True:
        retry = False
        try:
            row = measure(model, prompts, spec, batch, **settings)
        except PrefillOutOfMemory as exc:
            row = {"config": spec.key, "batch": batch, "oom": f"prefill: {exc}"}
            retry = min(batch, settings["prefill_rows"]) > 1
        except torch.cuda.OutOfMemoryError as exc:
            row = {"config": spec.key, "batch": batch, "oom": str(exc).splitlines()[0]}
        gc.collect()  # here, once the except blocks have dropped the failed frames and their tensors
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
        if not retry:
            return row
        settings["prefill_rows"] = min(batch, settings["prefill_rows"]) // 2


def largest_batch(kv_memory: int, bytes_per_row: float, shared_bytes: int) -> int:
    """Most rows whose cache (``shared_bytes`` + ``bytes_per_row`` each) fits in ``kv_memory`` bytes."""
    return max(0, int((kv_memory - shared_bytes) // bytes_per_row))


def sweep(model, prompts, chosen, batches, settings, kv_memory, save) -> tuple[list, list]:
    """Batch sweep of every cache, then its run at the largest batch that fits ``kv_memory``.

    When that batch runs out of memory, the fixed-memory row is the largest measured batch below it, with
    ``batch_fits`` and ``oom_at_fitting_batch`` saying so. ``save(rows, fixed)`` runs after every row, so a
    run cut short by a time limit leaves what it measured.
    """
    rows, fixed = [], []
    for spec in chosen:
        options = dict(settings)  # rows per prefill forward, halved on OOM, per cache
        measured = []
        for batch in batches:
            rows.append(attempt(model, prompts, spec, batch, options))
            print(_line(rows[-1]), flush=True)
            save(rows, fixed)
            if "oom" in rows[-1]:
                break
            measured.append(rows[-1])
        if not measured or not kv_memory:
            continue
        last = measured[-1]
        fits = largest_batch(kv_memory, last["bytes_per_row"], last["shared_bytes"])
        run = attempt(model, prompts, spec, fits, options) if fits else {"oom": "no row fits"}
        if "oom" in run:
            below = [r for r in measured if r["batch"] <= fits]
            run = {**(below[-1] if below else {}), "oom_at_fitting_batch": run["oom"]}
        fixed.append({**run, "config": spec.key, "kv_memory": kv_memory, "batch_fits": fits})
        print(f"at {kv_memory / GiB:g} GiB of KV: {_line(fixed[-1])}", flush=True)
        save(rows, fixed)
    base = next((f for f in fixed if f["config"] == "full" and "tokens_per_s" in f), None)
    for f in fixed:
        if base is not None and "tokens_per_s" in f:
            f["batch_vs_full"] = f["batch"] / base["batch"]
            f["tokens_per_s_vs_full"] = f["tokens_per_s"] / base["tokens_per_s"]
    return rows, fixed


def target(fixed: list) -> dict | None:
    """The issue's goal: PyramidKV + FibQuant serves >= 8x the batch and >= 5x the tokens/s of the full cache."""
    both = next((f for f in fixed if f["config"] == "pyramidkv+fibquant"), None)
    if both is None or "batch_vs_full" not in both:
        return None
    batch, speed = both["batch_vs_full"], both["tokens_per_s_vs_full"]
    return {"batch_vs_full": batch, "tokens_per_s_vs_full": speed, "met": batch >= 8 and speed >= 5}


def _line(row: dict) -> str:
    if "ms_per_step" not in row:
        return f"{row['config']} batch {row.get('batch', '-')}: {row.get('oom', 'oom')[:100]}"
    return (
        f"{row['config']} [{row['kernel']}] batch {row['batch']}: {row['ms_per_step']:.1f} ms/step, "
        f"{row['tokens_per_s']:,.0f} tokens/s, cache {row['cache_bytes'] / GiB:.3f} GiB"
    )


def _print_table(title: str, header: list[str], cells: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *cells]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, ["-" * w for w in widths], *cells]:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)))


def _gib(value) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def _sweep_cells(r: dict, label: str) -> list:
    if "ms_per_step" not in r:
        return [label, "", r["batch"], "out of memory", *[""] * 6]
    times = [f"{r['prefill_s']:.2f}", f"{r['ms_per_step']:.1f}", f"{r['tokens_per_s']:,.0f}"]
    memory = [_gib(r[k]) for k in ("cache_bytes", "prefill_peak_bytes", "decode_peak_bytes")]
    return [label, r["kernel"], r["batch"], r["prefill_rows"], *times, *memory]


def _fixed_cells(f: dict, label: str) -> list:
    if "tokens_per_s" not in f:
        return [label, "", f["batch_fits"], "none", *[""] * 4]
    ratios = f"{f.get('batch_vs_full', 0):.1f}x, {f.get('tokens_per_s_vs_full', 0):.1f}x"
    speed = [f"{f['ms_per_step']:.1f}", f"{f['tokens_per_s']:,.0f}", _gib(f["cache_bytes"]), ratios]
    return [label, f"{f['bytes_per_row'] / 2**20:.2f}", f["batch_fits"], f["batch"], *speed]


def print_tables(rows: list, fixed: list, labels: dict, title: str) -> None:
    header = ["config", "kernel", "batch", "prefill rows", "prefill s", "ms/step", "tokens/s"]
    header += ["cache GiB", "prefill peak GiB", "decode peak GiB"]
    cells = [_sweep_cells(r, labels[r["config"]]) for r in rows]
    _print_table(f"decode throughput, {title}", header, cells)
    if fixed:
        header = ["config", "MiB/row", "batch fits", "batch run", "ms/step", "tokens/s"]
        header += ["cache GiB", "vs full: batch, tokens/s"]
        cells = [_fixed_cells(f, labels[f["config"]]) for f in fixed]
        title = f"at a fixed KV memory of {_gib(fixed[0]['kv_memory'])} GiB"
        _print_table(title, header, cells)


def parse_batches(parser: argparse.ArgumentParser, given: str) -> list[int]:
    """``--batches 1,8,32`` -> sorted distinct integers >= 1, or the parser's error naming the option."""
    try:
        batches = sorted({int(b) for b in given.split(",")})
    except ValueError:
        batches = [0]
    if batches[0] < 1:
        parser.error(f"--batches: got {given!r}; expected comma-separated integers >= 1")
    return batches


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", default=None, help="default: $PYRAMIDKV_MODEL, else the embedded model")
    add("--prompt", type=int, default=8000, help="prompt tokens per row")
    add("--batches", default="1,8,32,64,128,256,512,1024,2048,4096")
    add("--configs", default="full,pyramidkv,fibquant,pyramidkv+fibquant")
    add("--budget", default="10%")
    add("--codec", default="fibquant:2")
    add(
        "--plan-memory",
        default="3%",
        help="the byte budget of the 'plan' cache (planner, plan=auto)",
    )
    add("--graph", action="store_true", help="decode by CUDA-graph replay over a static copy (GPU)")
    add("--kernel", default="auto", choices=("auto", "torch", "triton"))
    add("--steps", type=int, default=32)
    add("--warmup", type=int, default=3)
    add("--prefill-rows", type=int, default=128, help="most rows per prefill forward")
    add("--kv-memory", default="16GiB", help="fixed KV memory; 0 skips that part")
    add("--out", default=None, help="default benchmarks/results (smoke: the temp folder)")
    add("--smoke", action="store_true", help="CPU: prompt 256, batch 1,2, 3 steps, 12 MiB")
    if parser.parse_known_args(argv)[
        0
    ].smoke:  # smoke sizes replace the defaults, not given options
        parser.set_defaults(prompt=256, batches="1,2", steps=3, warmup=1, prefill_rows=1)
        parser.set_defaults(kv_memory="12MiB")
    args = parser.parse_args(argv)
    for name in ("prompt", "steps", "prefill_rows", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}; too small")
    try:
        args.kv_memory_bytes = 0 if args.kv_memory == "0" else parse_memory(args.kv_memory).nbytes
    except PyramidKVError:
        args.kv_memory_bytes = None
    if args.kv_memory_bytes is None:
        parser.error(f"--kv-memory: got {args.kv_memory!r}; expected bytes (16GiB, 512MiB) or 0")
    args.batches = parse_batches(parser, args.batches)
    if args.graph and not torch.cuda.is_available():
        parser.error("--graph: needs a CUDA device (captured steps)")
    unknown = set(args.configs.split(",")) - set(specs("", ""))
    if unknown:
        parser.error(
            f"--configs: unknown {sorted(unknown)}; expected some of {list(specs('', ''))}"
        )
    return args


def main(argv=None) -> None:
    args = arguments(argv)
    model, tokenizer = load(args.model, device="cpu" if args.smoke else None)
    device, positions = model.device, model.config.max_position_embeddings
    if args.prompt + args.warmup + args.steps > positions:
        raise SystemExit(
            f"--prompt: {args.prompt} + {args.warmup} warm-up + {args.steps} steps is more than "
            f"the model's {positions} positions"
        )
    prompts = corpus_rows(tokenizer, min(args.prefill_rows, args.batches[-1]), args.prompt)
    chosen = [
        specs(args.budget, args.codec, args.plan_memory)[key] for key in args.configs.split(",")
    ]
    settings = dict(kernel=args.kernel, steps=args.steps, warmup=args.warmup, graph=args.graph)
    floor = attempt(
        model, prompts[:, :16], specs("", "")["full"], 1, {**settings, "prefill_rows": 1}
    )
    settings["prefill_rows"] = args.prefill_rows
    layers, kv_heads, head_dim = kv_geometry(model.config)
    record = {
        "question": "decode tokens/s, ms/step and peak memory per cache and batch; batch at fixed KV memory",
        "date": date.today().isoformat(),
        "command": shlex.join(["python", sys.argv[0], *sys.argv[1:]]),
        "machine": machine.describe(device),
        "model": {
            "name": model.config.name_or_path or args.model or "embedded",
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "attention": model.config._attn_implementation,
            **dict(layers=layers, kv_heads=kv_heads, head_dim=head_dim),
        },
        "prompt": {"tokens": args.prompt, "source": source(), "padding": "none"},
        "configs": {spec.key: asdict(spec) for spec in chosen},
        "settings": vars(args),
        "step_floor": floor,
        "complete": False,
    }
    out = Path(args.out or (tempfile.gettempdir() if args.smoke else "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"generate_throughput_{'smoke_' if args.smoke else ''}{device.type}.json"

    def save(rows: list, fixed: list) -> None:
        record.update(rows=rows, fixed_kv_memory=fixed, target=target(fixed))
        path.write_text(json.dumps(record, indent=2) + "\n")

    rows, fixed = sweep(model, prompts, chosen, args.batches, settings, args.kv_memory_bytes, save)
    record["complete"] = True
    save(rows, fixed)
    title = f"{record['machine']['gpu'] or 'CPU'}, {record['model']['dtype']}, prompt {args.prompt}, {args.steps} steps"
    print_tables(rows, fixed, {s.key: s.label for s in chosen}, title)
    print(
        f"\nstep floor (16-token prompt, batch 1): {floor.get('ms_per_step', float('nan')):.1f} ms"
    )
    print(f"target (pyramidkv + fibquant at fixed KV memory against full): {record['target']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
