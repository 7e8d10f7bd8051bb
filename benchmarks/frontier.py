"""Quality against bytes: fixed configurations (policy x codec x bits) and the memory planner, each held to the
same byte budgets, from 1% to 30% of the prompt's fp16 cache.

    python benchmarks/frontier.py --context 2k --samples 20 --shares 1,2,3,5,10,15,25,30

Each text window is prefilled once; every configuration at every budget is rebuilt from that capture
(pyramidkv.eval.prefill) with ``kv_memory`` set to the share of the fp16 cache in bytes, so each cache holds at
most the same bytes whatever dtype the model runs in, and reads the window's continuation with its compressed
past. Quality is the KL divergence from the full cache, top-1 agreement and perplexity (means with 95%
intervals over windows); the planner is compared with the best fixed configuration at each budget by the
paired difference of KL on the same windows. ``--text FILE`` reads the windows from a file instead of the
shipped corpus. Writes benchmarks/results/frontier_<device>.json and a .png beside it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import machine  # sibling script
from pyramidkv.cache.accounting import full_cache_nbytes
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.perplexity import REFERENCE, score, teacher_force, text_windows
from pyramidkv.eval.prefill import prefill
from pyramidkv.eval.results import write_json
from pyramidkv.eval.sweep import parse_lengths
from pyramidkv.models import load

RESULTS = Path(__file__).parent / "results"
FIXED = (
    "snapkv/none,snapkv/fibquant:2,snapkv/fibquant:3,snapkv/fibquant:4,snapkv/uniform/fibquant:2"
)
PLANNED = "snapkv,pyramidkv-adaptive"


def configurations(fixed: str, planned: str) -> list[tuple[str, dict]]:
    """(name, cache options) of each fixed ``policy/codec`` and each planned ``policy`` or ``policy@plan``
    (``snapkv@auto:3+4``)."""
    found = []
    for item in filter(None, fixed.split(",")):
        policy, _, codec = item.partition("/")
        name = policy if codec in ("", "none") else f"{policy} + {codec}"
        found.append((name, {"policy": policy, "codec": None if codec in ("", "none") else codec}))
    for item in filter(None, planned.split(",")):
        policy, _, plan = item.partition("@")
        name = f"plan {policy}" + (f" {plan}" if plan else "")
        found.append((name, {"policy": policy, "plan": plan or "auto"}))
    return found


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (normal approximation over samples)."""
    mean = statistics.fmean(values)
    half = (
        1.96 * statistics.stdev(values) / math.sqrt(len(values))
        if len(values) > 1
        else float("nan")
    )
    return mean, half


def measure_window(model, window, context, continuation, chunk, budgets, configs) -> list[dict]:
    """One record per (configuration, budget) for one window, all from one prefill."""
    inputs = window[:, context : context + continuation]
    targets = window[0, context + 1 :].to(model.device)
    full = full_cache_nbytes(model.config, context, 1, torch.float16)
    records = []
    with torch.inference_mode():
        captured = prefill(model, window[:, :context])
        with captured.cache(**REFERENCE.cache_options()) as cache:
            reference = torch.cat([x.float() for x in teacher_force(model, cache, inputs, chunk)])
        for share in budgets:
            for name, options in configs:
                start = time.perf_counter()
                try:
                    cache = captured.cache(kv_memory=int(share * full), **options)
                except PyramidKVError as exc:  # below the configuration's smallest cache
                    records.append({"config": name, "share": share, "skipped": str(exc)})
                    continue
                with cache:
                    held = cache.memory_report()["prompt_bytes"]
                    found = score(model, cache, inputs, targets, chunk, reference)
                records.append(
                    {
                        "config": name,
                        "share": share,
                        **found,
                        "bytes": held,
                        "bytes_share": held / full,
                        "seconds": time.perf_counter() - start,
                    }
                )
    return records


def summarize(records: list[dict], planned: list[str]) -> list[dict]:
    """Per (configuration, budget): KL, top-1 and perplexity with intervals; for a planned configuration, its
    paired KL difference from the best fixed configuration at that budget."""
    rows, by_key = [], {}
    for record in records:
        if "skipped" not in record:
            by_key.setdefault((record["config"], record["share"]), []).append(record)
    for (name, share), found in by_key.items():
        kl, kl_half = interval([r["kl"] for r in found])
        top1, top1_half = interval([r["top1"] for r in found])
        ppl, ppl_half = interval([r["ppl"] for r in found])
        rows.append(
            {
                "config": name, "share": share, "samples": len(found), "kl": kl, "kl_ci": kl_half,
                "top1": top1, "top1_ci": top1_half, "ppl": ppl, "ppl_ci": ppl_half,
                "bytes_share": max(r["bytes_share"] for r in found),
            }
        )  # fmt: skip
    for row in rows:
        if row["config"] not in planned:
            continue
        fixed = [
            r for r in rows if r["share"] == row["share"] and r["config"] not in planned
            and r["samples"] == row["samples"]
        ]  # fmt: skip
        if not fixed:
            continue
        best = min(fixed, key=lambda r: r["kl"])
        mine = by_key[(row["config"], row["share"])]
        theirs = {r["sample"]: r["kl"] for r in by_key[(best["config"], row["share"])]}
        diff, diff_half = interval([r["kl"] - theirs[r["sample"]] for r in mine])
        row.update(best_fixed=best["config"], best_fixed_kl=best["kl"], kl_vs_best=diff,
                   kl_vs_best_ci=diff_half, kl_ratio=row["kl"] / best["kl"])  # fmt: skip
    return sorted(rows, key=lambda r: (r["config"], r["share"]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in dict.fromkeys(r["config"] for r in rows):
        found = sorted((r for r in rows if r["config"] == name), key=lambda r: r["share"])
        x = [100 * r["share"] for r in found]
        style = "-o" if name.startswith("plan") else "--."
        left.errorbar(x, [r["kl"] for r in found], [r["kl_ci"] for r in found], fmt=style, label=name,
                      capsize=2)  # fmt: skip
        right.plot(x, [100 * r["top1"] for r in found], style, label=name)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="bytes, % of the fp16 cache",
        ylabel="KL from the full cache",
    )
    right.set(xscale="log", xlabel="bytes, % of the fp16 cache", ylabel="top-1 agreement, %")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", default="2k")
    parser.add_argument("--continuation", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shares", default="1,2,3,5,10,15,25,30", help="budgets, %% of the fp16 cache"
    )
    parser.add_argument("--fixed", default=FIXED, help="comma-separated policy/codec")
    parser.add_argument(
        "--planned", default=PLANNED, help="comma-separated policies (plan auto) or policy@auto:3+4"
    )
    parser.add_argument(
        "--text", type=Path, default=None, help="windows of this file, not the corpus"
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    (context,) = parse_lengths(args.context)
    budgets = [float(s) / 100 for s in args.shares.split(",")]
    configs = configurations(args.fixed, args.planned)
    model, tokenizer = load(args.model, device=args.device)
    text = args.text.read_text(encoding="utf-8", errors="replace") if args.text else None
    windows = text_windows(
        tokenizer, context + args.continuation + 1, args.samples, args.seed, text
    )
    records, started = [], time.perf_counter()
    for index, window in enumerate(windows):
        for record in measure_window(
            model, window, context, args.continuation, args.chunk, budgets, configs
        ):
            records.append({"sample": index, **record})
        print(
            f"window {index + 1}/{len(windows)}: {time.perf_counter() - started:.0f} s", flush=True
        )
    planned = [name for name, options in configs if "plan" in options]
    rows = summarize(records, planned)
    out = args.out or RESULTS / f"frontier_{model.device.type}.json"
    result = {
        "command": "python benchmarks/frontier.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine.describe(model.device),
        "context": context, "continuation": args.continuation, "samples": args.samples,
        "text": str(args.text) if args.text else "corpus", "seconds": time.perf_counter() - started,
        "rows": rows, "records": records,
    }  # fmt: skip
    write_json(out, result)
    plot(rows, out.with_suffix(".png"))
    for row in rows:
        versus = (
            f"  vs {row['best_fixed']}: {row['kl_vs_best']:+.4f} ± {row['kl_vs_best_ci']:.4f} "
            f"(x{row['kl_ratio']:.2f})" if "best_fixed" in row else ""
        )  # fmt: skip
        print(
            f"{row['config']:32s} {100 * row['share']:5.1f}%  KL {row['kl']:.4f} ± {row['kl_ci']:.4f}  "
            f"top-1 {100 * row['top1']:.1f}%{versus}"
        )
    return result


if __name__ == "__main__":
    main()
