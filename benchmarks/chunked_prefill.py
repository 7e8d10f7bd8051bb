"""Chunked prefill against one-shot compression: quality (KL from the full cache, top-1 agreement) of real text
read after a prompt compressed in chunks, the most bytes the cache held during the prefill, and prefill time.

    python benchmarks/chunked_prefill.py --context 4k --samples 8 --chunks 0,512,1024 \
        --configs snapkv/400,snapkv/10%,snapkv/400/fibquant:3

Each window's context is prefilled once per (configuration, chunk size) into ``CompressedCache(...,
prefill_chunk=chunk)`` (chunk 0: one forward), then its continuation is teacher-forced through the cache and
compared with the full cache's logits. "Held" is the most KV memory the prefill needs: before each chunk, what
the cache holds plus the chunk's own keys and values (held until the chunk is compressed back to the budget;
one-shot, the whole prompt's). On a GPU the script also reports
``torch.cuda.max_memory_allocated`` over the prefill (weights, activations and cache together). Writes
benchmarks/results/chunked_prefill_<device>.json.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import machine  # sibling script
from pyramidkv import CompressedCache
from pyramidkv.cache.accounting import full_cache_nbytes
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.eval.frontier import interval
from pyramidkv.eval.perplexity import REFERENCE, score, teacher_force, text_windows
from pyramidkv.eval.prefill import prefill
from pyramidkv.eval.results import write_json
from pyramidkv.eval.sweep import parse_lengths
from pyramidkv.models import load

RESULTS = Path(__file__).parent / "results"


def parse_config(item: str) -> dict:
    """``policy/budget[/codec]`` -> CompressedCache options."""
    policy, budget, *codec = item.split("/", 2)
    options = {"policy": policy, "budget": budget}
    if codec and codec[0] != "none":
        options["codec"] = codec[0]
    return options


def prefill_chunked(model, ids: torch.Tensor, options: dict, chunk: int) -> tuple:
    """The cache of ``ids`` prefilled in chunks (0: at once), the most bytes it held, and the seconds."""
    cache = CompressedCache(model, prefill_chunk=chunk or None, **options)
    held = 0
    device = ids.device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for piece in ids.split(chunk or ids.shape[1], dim=1):
        # what the cache holds, and the chunk's own keys and values until it is compressed back
        raw = full_cache_nbytes(model.config, piece.shape[1], piece.shape[0], model.dtype)
        held = max(held, cache.nbytes() + raw)
        model(piece, **cache_kwargs(model, cache))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return cache, held, seconds, peak


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", default="4k")
    parser.add_argument("--continuation", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--chunks", default="0,512,1024", help="chunk sizes; 0: one forward")
    parser.add_argument("--configs", default="snapkv/400,snapkv/10%,snapkv/400/fibquant:3")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    (context,) = parse_lengths(args.context)
    chunks = [int(c) for c in args.chunks.split(",")]
    configs = args.configs.split(",")
    model, tokenizer = load(args.model, device=args.device)
    windows = text_windows(tokenizer, context + args.continuation + 1, args.samples)
    records = []
    with torch.inference_mode():
        for index, window in enumerate(windows):
            window = window.to(model.device)
            inputs, targets = window[:, context:-1], window[0, context + 1 :]
            captured = prefill(model, window[:, :context])
            with captured.cache(**REFERENCE.cache_options()) as cache:
                reference = torch.cat([x.float() for x in teacher_force(model, cache, inputs, 32)])
            for item in configs:
                for chunk in chunks:
                    cache, held, seconds, peak = prefill_chunked(
                        model, window[:, :context], parse_config(item), chunk
                    )
                    with cache:
                        found = score(model, cache, inputs, targets, 32, reference)
                    records.append({"sample": index, "config": item, "chunk": chunk, **found,
                                    "held_bytes": held, "prefill_s": seconds, "peak_bytes": peak})  # fmt: skip
            print(f"window {index + 1}/{len(windows)}", flush=True)
    rows = []
    for item in configs:
        one_shot = {
            r["sample"]: r["kl"] for r in records if r["config"] == item and r["chunk"] == 0
        }
        for chunk in chunks:
            found = [r for r in records if r["config"] == item and r["chunk"] == chunk]
            kl, kl_ci = interval([r["kl"] for r in found])
            top1, top1_ci = interval([r["top1"] for r in found])
            row = {"config": item, "chunk": chunk, "kl": kl, "kl_ci": kl_ci, "top1": top1,
                   "top1_ci": top1_ci, "held_bytes": max(r["held_bytes"] for r in found),
                   "prefill_s": statistics.median(r["prefill_s"] for r in found)}  # fmt: skip
            if one_shot and chunk:
                diff = [r["kl"] - one_shot[r["sample"]] for r in found]
                row["kl_vs_one_shot"], row["kl_vs_one_shot_ci"] = interval(diff)
            if found[0]["peak_bytes"] is not None:
                row["peak_bytes"] = max(r["peak_bytes"] for r in found)
            rows.append(row)
            versus = (
                f"  vs one-shot {row['kl_vs_one_shot']:+.4f} ± {row['kl_vs_one_shot_ci']:.4f}"
                if "kl_vs_one_shot" in row
                else ""
            )
            print(
                f"{item:28s} chunk {chunk:5d}  KL {kl:.4f} ± {kl_ci:.4f}  top-1 {100 * top1:.1f}%  "
                f"held {row['held_bytes'] / 1e6:.2f} MB  prefill {row['prefill_s']:.2f} s{versus}"
            )
    command = ["python", "benchmarks/chunked_prefill.py", *(sys.argv[1:] if argv is None else argv)]
    result = {"command": shlex.join(command), "machine": machine.describe(model.device),
              "context": context, "continuation": args.continuation, "samples": args.samples,
              "rows": rows, "records": records}  # fmt: skip
    out = args.out or RESULTS / f"chunked_prefill_{model.device.type}.json"
    write_json(out, result)
    return result


if __name__ == "__main__":
    main()
