"""How much does compression add to prefill? Prefill time of the embedded model with the full cache and with
each eviction policy, plus the bytes each cache holds afterwards.

    python benchmarks/prefill_overhead.py --lengths 1024,2048,4096 --budget 128 --repeats 3

Writes benchmarks/results/prefill_overhead_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

import machine  # sibling script
from pyramidkv.cache.accounting import cache_nbytes
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.eval.corpus import shuffled_paragraphs
from pyramidkv.models import load

POLICIES = ("full", "pyramidkv", "snapkv", "h2o", "streamingllm")


def prompt(tokenizer, length: int) -> torch.Tensor:
    text = " ".join(shuffled_paragraphs(0))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :length]
    if ids.shape[1] < length:
        raise SystemExit(f"corpus has only {ids.shape[1]} tokens")
    return ids


def timed_prefill(model, ids, policy: str, budget: str) -> tuple[float, int]:
    cache = (
        DynamicCache(config=model.config)
        if policy == "full"
        else CompressedCache(model, policy, budget)
    )
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids, **cache_kwargs(model, cache))
    sync()
    seconds = time.perf_counter() - start
    nbytes = cache_nbytes(cache)
    if policy != "full":
        cache.close()
    return seconds, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--budget", default="128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    device = str(model.device)
    rows = []
    for length in map(int, args.lengths.split(",")):
        ids = prompt(tokenizer, length).to(model.device)
        timed_prefill(model, ids, "full", args.budget)  # warm-up
        for policy in POLICIES:
            runs = [timed_prefill(model, ids, policy, args.budget) for _ in range(args.repeats)]
            rows.append(
                {
                    "length": length,
                    "policy": policy,
                    "budget": args.budget,
                    "prefill_s_median": statistics.median(s for s, _ in runs),
                    "kv_bytes": runs[0][1],
                }
            )
    for row in rows:
        base = next(r for r in rows if r["length"] == row["length"] and r["policy"] == "full")
        row["overhead_vs_full"] = row["prefill_s_median"] / base["prefill_s_median"] - 1
    record = {
        "question": "prefill time and cache bytes with and without compression",
        "date": date.today().isoformat(),
        "machine": machine.describe(device),
        "dtype": str(next(model.parameters()).dtype),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = record["machine"]["gpu"]
    path = out / f"prefill_overhead_{'cuda' if gpu else 'cpu'}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    table = Table(title=f"prefill on {gpu or 'CPU'} ({record['dtype']}), budget {args.budget}")
    for col in ("length", "policy", "prefill ms", "overhead", "KV bytes"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["length"]),
            r["policy"],
            f"{r['prefill_s_median'] * 1e3:.1f}",
            f"{r['overhead_vs_full'] * 100:+.1f}%",
            f"{r['kv_bytes']:,}",
        )
    Console().print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
