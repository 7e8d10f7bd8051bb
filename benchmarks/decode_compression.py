"""Generation under a decode budget: quality against the full cache per position, memory against generated
tokens, and decode speed.

    python benchmarks/decode_compression.py --prompt 512 --generate 2048 --samples 4 \
        --configs snapkv/256/16,snapkv/1024/64,snapkv/1024/256,pyramidkv/1024/64,snapkv/1024/64/fibquant:3

For each real-text prompt the model first generates ``--generate`` tokens greedily with the full cache; the
same tokens are then teacher-forced through ``CompressedCache(policy, budget=B, decode_budget=B,
compress_every=N)`` (``policy/B/N[/codec]``), ``N/4`` tokens a forward: a compression happens after every ``N``
tokens, on a forward's boundary, so that is exactly the cache a token-by-token generation would have, and the
bytes held are read four times per interval (the sawtooth between compressions). KL from the full cache's logits and top-1
agreement are reported per bucket of generated positions (95% intervals over prompts), with the bytes the cache
holds after each block; ``--rows`` prompts go through together, each row keeping its own selection. ``--speed``
also times a greedy generation of ``--speed-tokens`` tokens (default ``--generate``), decode-compressed
against the full cache, eager and (on a GPU, configurations without codes) by CUDA-graph replay. Writes benchmarks/results/decode_compression_<device>.json and a
plot of bytes against generated tokens.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

import machine  # sibling script
from pyramidkv import CompressedCache
from pyramidkv.cache.accounting import full_cache_nbytes
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.eval.frontier import interval
from pyramidkv.eval.perplexity import kl_divergence, text_windows
from pyramidkv.eval.results import write_json
from pyramidkv.models import load

RESULTS = Path(__file__).parent / "results"
BUCKETS = (0, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def parse_config(item: str) -> dict:
    """``policy/budget/every[/codec]`` -> CompressedCache options (the prompt budget is the decode budget)."""
    policy, budget, every, *codec = item.split("/", 3)
    options = {"policy": policy, "budget": int(budget), "decode_budget": int(budget)}
    options["compress_every"] = int(every)
    if codec and codec[0] != "none":
        options["codec"] = codec[0]
    return options


def continuation(model, prompts: torch.Tensor, tokens: int) -> torch.Tensor:
    """The full cache's greedy continuations of ``prompts`` (rows, n): ``tokens`` new tokens per row, stop tokens
    suppressed (rows of equal length: no padding)."""
    with torch.inference_mode():
        out = model.generate(
            prompts, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
            cache_implementation=None, pad_token_id=0,
        )  # fmt: skip
    return out[:, prompts.shape[1] :]


def bucket_of(position: int) -> str:
    for low, high in itertools.pairwise(BUCKETS):
        if position < high:
            return f"{low}-{high}"
    return f"{BUCKETS[-1]}+"


def run_config(model, prompts, generated, options: dict) -> list[dict]:
    """KL and top-1 per generated position, and bytes held per row after each block, of one configuration.

    The rows of ``prompts`` (rows, n) are teacher-forced together, the full cache beside the compressed one block
    by block (no (rows, generate, vocab) reference is held); each row keeps its own selection, so a row's figures
    are those of its own generation.
    """
    piece = max(1, options["compress_every"] // 4)  # compressions fall on piece boundaries: exact
    rows = prompts.shape[0]
    cache, full = CompressedCache(model, **options), DynamicCache(config=model.config)
    kl, top1, held = [], [], []
    with torch.inference_mode():
        model(prompts, **cache_kwargs(model, cache))
        model(prompts, **cache_kwargs(model, full))
        inputs = generated[:, :-1]
        for start in range(0, inputs.shape[1], piece):
            block = inputs[:, start : start + piece]
            ref = model(block, **cache_kwargs(model, full)).logits.float()
            logits = model(block, **cache_kwargs(model, cache)).logits.float()
            kl.append(kl_divergence(ref, logits).cpu())
            top1.append((ref.argmax(-1) == logits.argmax(-1)).double().cpu())
            held.append((start + block.shape[1], cache.nbytes() // rows))
    cache.close()
    kl, top1 = torch.cat(kl, dim=1), torch.cat(top1, dim=1)
    return [{"kl": kl[r].tolist(), "top1": top1[r].tolist(), "held": held} for r in range(rows)]


def speed(
    model, tokenizer, text: str, tokens: int, options: dict | None, graph: bool = False
) -> float:
    """Decode tokens/s of a greedy generation of ``tokens`` tokens (``options`` None: full cache), eager or, with
    ``graph``, by CUDA-graph replay (a decode budget without codes selects again between replays)."""
    from pyramidkv.generation import generate

    cache = None if options is None else CompressedCache(model, **options)
    result = generate(
        model,
        tokenizer,
        text,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        chat=False,
        cache=cache,
        cuda_graph=graph,
    )
    if cache is not None:
        cache.close()
    return result.decode_tokens_per_s


def summarize(records: list[dict], configs: list[str]) -> list[dict]:
    rows = []
    for item in configs:
        found = [r for r in records if r["config"] == item]
        buckets = {}
        for name in dict.fromkeys(bucket_of(i) for i in range(len(found[0]["kl"]))):
            per_sample = [
                [v for i, v in enumerate(r[key]) if bucket_of(i) == name]
                for r in found
                for key in ("kl",)
            ]
            kl = interval([sum(s) / len(s) for s in per_sample])
            agree = [
                sum(v for i, v in enumerate(r["top1"]) if bucket_of(i) == name) / len(s)
                for r, s in zip(found, per_sample, strict=True)
            ]
            top1 = interval(agree)
            buckets[name] = {"kl": kl[0], "kl_ci": kl[1], "top1": top1[0], "top1_ci": top1[1]}
        held = [b for _, b in found[0]["held"]]
        threshold = len(held) // 4  # flatness after the first quarter of the generation
        after = held[threshold:]
        rows.append(
            {
                "config": item,
                "buckets": buckets,
                "kl": interval([sum(r["kl"]) / len(r["kl"]) for r in found]),
                "top1": interval([sum(r["top1"]) / len(r["top1"]) for r in found]),
                "bytes_max_after_quarter": max(after),
                "bytes_min_after_quarter": min(after),
                "flat_within": max(after) / min(after) - 1,
            }
        )
    return rows


def plot(records: list[dict], configs: list[str], full_held: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*full_held, strict=True), label="full cache", color="black")
    for item in configs:
        held = next(r["held"] for r in records if r["config"] == item)
        ax.plot(*zip(*held, strict=True), label=item)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV bytes held")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--generate", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--configs", default="snapkv/256/16,snapkv/1024/64,snapkv/1024/256")
    parser.add_argument(
        "--rows", type=int, default=8, help="prompts generated and teacher-forced together"
    )
    parser.add_argument("--speed", action="store_true")
    parser.add_argument(
        "--speed-tokens", type=int, default=None, help="tokens timed; default --generate"
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    model, tokenizer = load(args.model, device=args.device)
    records, full_held = [], []
    windows = text_windows(tokenizer, args.prompt, args.samples)
    for first in range(0, args.samples, args.rows):
        prompts = torch.cat(windows[first : first + args.rows]).to(model.device)
        generated = continuation(model, prompts, args.generate + 1)
        if first == 0:  # what the full cache holds after n generated tokens
            step = max(1, args.generate // 64)
            full_held = [(n, full_cache_nbytes(model.config, args.prompt + n, 1, model.dtype))
                         for n in range(step, args.generate + 1, step)]  # fmt: skip
        for item in configs:
            found = run_config(model, prompts, generated, parse_config(item))
            records += [{"sample": first + r, "config": item, **f} for r, f in enumerate(found)]
        print(f"prompts {first + len(prompts)}/{args.samples}", flush=True)
    rows = summarize(records, configs)
    for row in rows:
        print(f"{row['config']:28s} KL {row['kl'][0]:.4f} ± {row['kl'][1]:.4f}  top-1 "
              f"{100 * row['top1'][0]:.1f}%  bytes flat within {100 * row['flat_within']:.1f}%")  # fmt: skip
        for name, b in row["buckets"].items():
            print(
                f"    {name:>10s}  KL {b['kl']:.4f} ± {b['kl_ci']:.4f}  top-1 {100 * b['top1']:.1f}%"
            )
    speeds = {}
    if args.speed:
        text = tokenizer.decode(text_windows(tokenizer, args.prompt, 1)[0][0])
        timed = args.speed_tokens or args.generate
        speeds["full"] = speed(model, tokenizer, text, timed, None)
        for item in configs:
            speeds[item] = speed(model, tokenizer, text, timed, parse_config(item))
        if (
            model.device.type == "cuda"
        ):  # the graph path: full cache against the budgets without codes
            speeds["full@graph"] = speed(model, tokenizer, text, timed, None, graph=True)
            for item in configs:
                options = parse_config(item)
                if "codec" not in options:
                    speeds[f"{item}@graph"] = speed(
                        model, tokenizer, text, timed, options, graph=True
                    )
        print("decode tokens/s:", {k: round(v, 1) for k, v in speeds.items()})
    device = model.device.type
    args.out.mkdir(parents=True, exist_ok=True)
    plot(records, configs, full_held, args.out / f"decode_compression_{device}.png")
    command = [
        "python",
        "benchmarks/decode_compression.py",
        *(sys.argv[1:] if argv is None else argv),
    ]
    result = {"command": shlex.join(command), "machine": machine.describe(model.device),
              "prompt": args.prompt, "generate": args.generate, "samples": args.samples, "rows": rows,
              "decode_tokens_per_s": speeds, "full_held": full_held,
              "records": [{k: v for k, v in r.items() if k not in ("kl", "top1")} for r in records]}  # fmt: skip
    write_json(args.out / f"decode_compression_{device}.json", result)
    return result


if __name__ == "__main__":
    main()
