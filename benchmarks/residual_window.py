"""Which fp16 recent window should a quantized cache keep? Quality and bytes against the window size.

    python benchmarks/residual_window.py --context 512 --continuation 256 --chunk 8 --samples 2

Policy full, FibQuant 2-bit: the prompt is all codes; continuation tokens are appended ``chunk`` at a
time and wait in the fp16 window until it holds ``residual`` tokens, then become one block of codes.
A larger window keeps more recent tokens exact (KIVI keeps 32-128) at fp16's cost. Writes
benchmarks/results/residual_window_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import machine  # sibling script
from pyramidkv.eval import corpus
from pyramidkv.eval.perplexity import PerplexityTask, kl_divergence, teacher_force
from pyramidkv.eval.prefill import prefill
from pyramidkv.models import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--residuals", default="8,16,32,64,128,256")
    parser.add_argument("--codec", default="fibquant:2")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    model, tokenizer = load(device=args.device)
    task = PerplexityTask(args.context, args.continuation, args.chunk)
    residuals = [int(r) for r in args.residuals.split(",")]
    stats = {r: {"nll": [], "kl": [], "bytes": []} for r in residuals}
    for window in task.windows(tokenizer, args.samples):
        captured = prefill(model, window[:, : args.context])
        inputs = window[:, args.context : -1]
        targets = window[0, args.context + 1 :]
        with captured.cache("full", "100%") as full, torch.inference_mode():
            reference = torch.cat(list(teacher_force(model, full, inputs, args.chunk)))
        for r in residuals:
            with (
                captured.cache("full", "100%", codec=args.codec, residual=r) as cache,
                torch.inference_mode(),
            ):
                logits = torch.cat(list(teacher_force(model, cache, inputs, args.chunk)))
                stats[r]["bytes"].append(cache.nbytes())
            logp = torch.log_softmax(logits.double(), -1)
            stats[r]["nll"].append(-logp.gather(-1, targets[:, None].to(logp.device)).mean().item())
            stats[r]["kl"].append(kl_divergence(reference, logits).mean().item())
    rows = [
        {
            "residual": r,
            "ppl": math.exp(sum(s["nll"]) / len(s["nll"])),
            "kl": sum(s["kl"]) / len(s["kl"]),
            "bytes_after": sum(s["bytes"]) / len(s["bytes"]),
        }
        for r, s in stats.items()
    ]
    device = str(model.device)
    record = {
        "question": "quality and bytes of a quantized cache against its fp16 recent-window size",
        "date": date.today().isoformat(),
        "command": "python benchmarks/residual_window.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "machine": machine.describe(device),
        "corpus": corpus.source(),
        "codec": args.codec,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"residual_window_{torch.device(device).type}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    table = Table(title=f"{args.codec}, context {args.context}, continuation {args.continuation}")
    for column in ("residual", "perplexity", "KL (nats)", "bytes after"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["residual"]),
            f"{row['ppl']:.3f}",
            f"{row['kl']:.4f}",
            f"{row['bytes_after']:,.0f}",
        )
    Console().print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
