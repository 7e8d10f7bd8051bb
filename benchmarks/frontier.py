"""Quality against bytes: fixed configurations and the memory planner at budgets of 1-30% of the fp16 cache
(:mod:`pyramidkv.eval.frontier`; the same as `pyramidkv frontier`), written where the benchmarks keep results.

    python benchmarks/frontier.py --context 2k --samples 20 --shares 1,2,3,5,10,15,25,30

Writes benchmarks/results/frontier_<device>.json (with the command and the machine) and a .png beside it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rich.console import Console

import machine  # sibling script
from pyramidkv.eval.frontier import FIXED, PLANNED, SHARES, FrontierOptions, run_frontier
from pyramidkv.models import load

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", default="2k")
    parser.add_argument("--continuation", default="64")
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shares", default=SHARES, help="budgets, %% of the fp16 cache")
    parser.add_argument("--fixed", default=FIXED, help="comma-separated policy/codec")
    parser.add_argument(
        "--planned", default=PLANNED, help="policies (plan auto) or policy@auto:3+4"
    )
    parser.add_argument(
        "--text", type=Path, default=None, help="windows of this file, not the corpus"
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    options = FrontierOptions(
        args.fixed, args.planned, args.shares, args.context, args.continuation, args.chunk,
        args.samples, args.seed, args.text,
    )  # fmt: skip
    model, tokenizer = load(args.model, device=args.device)
    out = args.out or RESULTS / f"frontier_{model.device.type}.json"
    name = args.model or "embedded SmolLM2-135M-Instruct"
    command = ["python", "benchmarks/frontier.py", *(sys.argv[1:] if argv is None else argv)]
    extra = {"command": shlex.join(command), "machine": machine.describe(model.device)}
    return run_frontier(model, tokenizer, options, name, out, Console(width=140), extra)


if __name__ == "__main__":
    main()
