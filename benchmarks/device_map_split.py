"""A model split over devices against the same model on one device: same greedy output, decode speed, memory.

The embedded model (float32) runs PyramidKV at 10% of a ~2k-token prompt with FibQuant codes at 2 bits, once
with every layer on cuda:0 and once with the first half of the decoder layers (and the embeddings and head)
on cuda:0 and the second half on the CPU (issue 8). accelerate's ``dispatch_model`` places the layers;
``main_device="cpu"`` makes the CPU layers run on the CPU (by default accelerate would only store them there
and run them on the GPU). Each layout runs with the default kernel (``auto``: fused Triton kernel on CUDA
layers, torch reference on CPU layers) and with ``kernel="torch"`` everywhere, which takes the kernel's
rounding out of the comparison. Per run: the 32 greedy tokens, prefill and decode time, the peak CUDA memory,
the weights and the cache bytes held on each device.

    PYTHONPATH=src python benchmarks/device_map_split.py            # H200: ~1 minute
    PYTHONPATH=src python benchmarks/device_map_split.py --smoke    # tiny random model, CPU, seconds

Writes benchmarks/results/device_map_split_<device>.json (``--smoke``: device_map_split_smoke_<device>.json)
and prints a table. Without CUDA the "split" layout keeps every layer on the CPU behind accelerate's hooks:
it checks the script, not the split.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch
from accelerate import dispatch_model
from rich.console import Console
from rich.table import Table

import machine  # sibling script
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache

KERNELS = ("auto", "torch")


def tiny_model():
    """A random-weight llama small enough for a CPU (the smoke run), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=211, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)  # clear-cut greedy choices
    return model


def embedded_model(dtype: torch.dtype, tokens: int):
    """The embedded model on the CPU and a prompt of ``tokens`` tokens of real prose."""
    from pyramidkv.eval.corpus import shuffled_paragraphs
    from pyramidkv.models import load

    model, tokenizer = load(device="cpu", dtype=dtype)
    ids = tokenizer(" ".join(shuffled_paragraphs(0)), return_tensors="pt")["input_ids"][:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"prompt: the corpus has only {ids.shape[1]} tokens, asked for {tokens}")
    return model, ids


def split_map(model, first: torch.device, second: torch.device) -> dict:
    """First half of the decoder layers, the embeddings and the (tied) head on ``first``; the rest on ``second``."""
    n = model.config.num_hidden_layers
    return {
        "model.embed_tokens": first,
        "model.rotary_emb": first,
        **{f"model.layers.{i}": first if i < n // 2 else second for i in range(n)},
        "model.norm": second,
        "lm_head": first,
    }


def cuda_devices(model) -> list[torch.device]:
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


def sync(model) -> float:
    for device in cuda_devices(model):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def by_device(pairs) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for device, nbytes in pairs:
        totals[str(device)] += nbytes
    return dict(totals)


def run(model, ids: torch.Tensor, args, kernel: str, steps: int) -> dict:
    """Prefill ``ids``, then ``steps - 1`` greedy decode steps; times, tokens, logits and bytes per device."""
    options = dict(policy=args.policy, budget=args.budget, codec=args.codec, kernel=kernel)
    for device in cuda_devices(model):
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), CompressedCache(model, **options) as cache:
        start = sync(model)
        logits = model(ids.to(model.device), **cache_kwargs(model, cache)).logits[:, -1].float()
        prefill_s = sync(model) - start
        history, tokens = [logits.cpu()], [int(logits.argmax())]
        start = sync(model)
        for _ in range(steps - 1):
            step = torch.tensor([[tokens[-1]]], device=model.device)
            logits = model(step, **cache_kwargs(model, cache)).logits[:, -1].float()
            tokens.append(int(logits.argmax()))
            history.append(logits.cpu())
        decode_s = sync(model) - start
        cache_bytes = by_device((layer.device, layer.nbytes()) for layer in cache.layers)
        shared = cache.codebook_nbytes()
    return {
        "tokens": tokens,
        "logits": torch.cat(history),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_tokens_per_s": (steps - 1) / decode_s if decode_s > 0 else float("nan"),
        "cache_bytes_by_device": cache_bytes,
        "codebook_bytes_per_device": shared,
        "cuda_peak_bytes": {
            str(d): torch.cuda.max_memory_allocated(d) for d in cuda_devices(model)
        },
    }


def measure(model, ids, args, kernel: str) -> dict:
    """A warm-up run (Triton compilation, codebook copies), then the median of ``--repeats`` runs."""
    run(model, ids, args, kernel, steps=4)
    runs = [run(model, ids, args, kernel, args.new_tokens) for _ in range(args.repeats)]
    best = runs[0]
    for key in ("prefill_s", "decode_s", "decode_tokens_per_s"):
        best[key] = statistics.median(r[key] for r in runs)
    best["same_tokens_every_repeat"] = all(r["tokens"] == best["tokens"] for r in runs)
    return best


def compare(split: dict, single: dict) -> dict:
    """Token agreement, and the largest logit difference over the steps both runs fed the same tokens."""
    a, b = split["tokens"], single["tokens"]
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    same = len(a) if first is None else first + 1  # step `first` still saw the same past
    diff = (split["logits"][:same] - single["logits"][:same]).abs().max().item()
    scale = single["logits"][:same].abs().max().item()
    return {
        "tokens_equal": first is None,
        "first_difference": first,
        "max_abs_logit_diff": diff,
        "max_abs_logit": scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model on the CPU")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--policy", default="pyramidkv")
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--codec", default="fibquant:2")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.new_tokens, args.repeats = (
            min(args.tokens, 160),
            min(args.new_tokens, 8),
            1,
        )
    dtype = getattr(torch, args.dtype)
    gpu = torch.device("cuda", 0) if torch.cuda.is_available() else None
    if args.smoke:
        base = tiny_model().to(dtype)
        ids = torch.randint(
            3, base.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0)
        )
    else:
        base, ids = embedded_model(dtype, args.tokens)
    fast = gpu or torch.device("cpu")
    placement = split_map(base, fast, torch.device("cpu"))
    split = dispatch_model(copy.deepcopy(base), placement, main_device="cpu", force_hooks=True)
    single = base.to(fast)
    layouts = {"single": single, "split": split}
    results: dict[str, dict] = {name: {} for name in layouts}
    for kernel in KERNELS:
        for name, model in layouts.items():
            results[name][kernel] = measure(model, ids, args, kernel)
    comparisons = {k: compare(results["split"][k], results["single"][k]) for k in KERNELS}
    weights = {
        name: by_device((p.device, p.numel() * p.element_size()) for p in model.parameters())
        for name, model in layouts.items()
    }
    for per_kernel in results.values():
        for result in per_kernel.values():
            result.pop("logits")
    record = {
        "question": "does a model split over devices give the single-device output, at what speed and memory",
        "date": date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "machine": machine.describe(fast),
        "model": "tiny random llama (smoke)" if args.smoke else "embedded SmolLM2-135M-Instruct",
        "dtype": args.dtype,
        "prompt_tokens": ids.shape[1],
        "new_tokens": args.new_tokens,
        "policy": args.policy,
        "budget": args.budget,
        "codec": args.codec,
        "split_layout": {name: str(device) for name, device in placement.items()},
        "weights_bytes_by_device": weights,
        "results": results,
        "split_vs_single": comparisons,
        "cpu_peak_rss_bytes_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "device_map_split_smoke" if args.smoke else "device_map_split"
    path = out / f"{stem}_{'cuda' if gpu else 'cpu'}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    show(record)
    print(f"wrote {path}")


def show(record: dict) -> None:
    title = (
        f"{record['policy']} {record['budget']} + {record['codec']}, {record['prompt_tokens']} prompt tokens, "
        f"{record['new_tokens']} new, {record['dtype']} on {record['machine']['gpu'] or 'CPU'}"
    )
    table = Table(title=title)
    for col in (
        "layout",
        "kernel",
        "prefill s",
        "decode tok/s",
        "CUDA peak",
        "cache bytes",
        "same as single",
    ):
        table.add_column(col, justify="right")
    for name, per_kernel in record["results"].items():
        for kernel, r in per_kernel.items():
            verdict = record["split_vs_single"][kernel]
            same = (
                "-" if name == "single"
                else "yes" if verdict["tokens_equal"]
                else f"from token {verdict['first_difference']}"
            )  # fmt: skip
            table.add_row(
                name,
                kernel,
                f"{r['prefill_s']:.3f}",
                f"{r['decode_tokens_per_s']:.1f}",
                ", ".join(f"{d} {b / 2**20:.0f} MiB" for d, b in r["cuda_peak_bytes"].items())
                or "-",
                ", ".join(f"{d} {b:,}" for d, b in r["cache_bytes_by_device"].items()),
                same,
            )
    Console().print(table)


if __name__ == "__main__":
    main()
