"""Do centred keys pay? KL from the full cache, top-1 agreement and perplexity of text read with a coded past,
each configuration with its keys centred (the default for FibQuant and TurboQuant codes) and without.

    python benchmarks/centred_keys.py --model gemma3-270m --context 2048 --samples 16 \
        --configs full/all/fibquant:3,snapkv/10%/fibquant:3,snapkv/kv45%/plan

Every corpus window of ``--context`` tokens is prefilled once (:func:`pyramidkv.eval.perplexity.capture_with_reference`); each
configuration (``policy/budget/codec`` as in ``pyramidkv eval``) is built from that capture twice, with
``center_keys=False`` and ``True``, and the next ``--continuation`` tokens are teacher-forced through it
(:func:`pyramidkv.eval.perplexity.score`). The two share the prompt, the tokens kept (the scores come from the
same capture) and all but the key shifts' bytes, so the paired difference of their KL per window is the
effect of centring alone: reported with a 95% interval over windows. Writes
benchmarks/results/centred_keys_<model>.json.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

import machine  # sibling script
from pyramidkv.eval.frontier import interval
from pyramidkv.eval.perplexity import PerplexityTask, capture_with_reference, score
from pyramidkv.eval.results import write_json
from pyramidkv.eval.runner import Config
from pyramidkv.models import load

RESULTS = Path(__file__).parent / "results"
METRICS = ("kl", "top1", "ppl")


def parse_config(item: str) -> Config:
    """``policy/budget/codec`` -> the harness's configuration (``full/all/fibquant:3``)."""
    policy, budget, codec = item.split("/", 2)
    config = Config(policy, budget, codec)
    if config.codec == "none":
        raise SystemExit(f"--configs: {item!r} has no codec; centring applies to coded keys")
    return config


def measure_window(
    model, window: torch.Tensor, configs: list[Config], task: PerplexityTask
) -> list:
    """Records of every configuration, plain and centred, on one window (one prefill)."""
    records = []
    with torch.inference_mode():
        captured, inputs, targets, reference = capture_with_reference(model, window, task)
        for config in configs:
            for center in (False, True):
                with captured.cache(**config.cache_options(), center_keys=center) as cache:
                    found = score(model, cache, inputs, targets, task.chunk, reference)
                    held = cache.nbytes()
                records.append({"config": config.key, "centred": center, **found, "bytes": held})
    return records


def summarize(records: list[dict], configs: list[Config]) -> list[dict]:
    rows = []
    for config in configs:
        mine = [r for r in records if r["config"] == config.key]
        plain = [r for r in mine if not r["centred"]]
        centred = [r for r in mine if r["centred"]]
        row = {"config": config.key, "samples": len(plain)}
        for name, group in (("plain", plain), ("centred", centred)):
            row[name] = {metric: interval([r[metric] for r in group]) for metric in METRICS}
            row[name]["bytes"] = group[0]["bytes"]
        paired = [c["kl"] - p["kl"] for p, c in zip(plain, centred, strict=True)]
        row["kl_change"] = interval(paired)  # centred minus plain, per window
        row["kl_ratio"] = row["centred"]["kl"][0] / max(row["plain"]["kl"][0], 1e-30)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="default: $PYRAMIDKV_MODEL, else the embedded model"
    )
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument(
        "--configs",
        default="full/all/fibquant:2,full/all/fibquant:3,full/all/turboquant:3,snapkv/10%/fibquant:3",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    configs = [parse_config(item) for item in args.configs.split(",")]
    task = PerplexityTask(args.context, args.continuation)
    model, tokenizer = load(args.model, device=args.device)
    records = []
    for index, window in enumerate(task.windows(tokenizer, args.samples)):
        records += measure_window(model, window, configs, task)
        print(f"window {index + 1}/{args.samples}", flush=True)
    rows = summarize(records, configs)
    for row in rows:
        plain, centred, change = row["plain"], row["centred"], row["kl_change"]
        print(
            f"{row['config']:28s} KL {plain['kl'][0]:.4f} ± {plain['kl'][1]:.4f} -> "
            f"{centred['kl'][0]:.4f} ± {centred['kl'][1]:.4f} (paired change {change[0]:+.4f} ± "
            f"{change[1]:.4f}); top-1 {100 * plain['top1'][0]:.1f}% -> {100 * centred['top1'][0]:.1f}%; "
            f"bytes {plain['bytes']:,} -> {centred['bytes']:,}"
        )
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.model or "embedded").stem)
    result = {
        **machine.header(
            "KL of coded caches with and without centred keys",
            "centred_keys.py",
            argv,
            model.device,
        ),
        "model": args.model or "embedded",
        "context": args.context,
        "continuation": args.continuation,
        "samples": args.samples,
        "rows": rows,
        "records": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"centred_keys_{name}.json", result)
    return result


if __name__ == "__main__":
    main()
