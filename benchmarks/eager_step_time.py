"""What does an eager decode step over a compressed cache cost over the full cache's, and what does the SDPA
backend context cost? ms per greedy step at batch 1, the full cache against PyramidKV (and, with ``--caches``,
codes read by the fused kernels: ``fibquant``, ``pyramidkv+fibquant``, ``turboquant``), each with the whole decode
inside :func:`~pyramidkv.cache.protocol.decode_backends` (as the other benchmarks decode) and without it (as a plain
``model.generate`` does, where PyramidKV's attention enters the context in every layer); ``--contexts``
picks either.

    PYTHONPATH=src python benchmarks/eager_step_time.py --random   # GPU: SmolLM2-shaped random weights
    PYTHONPATH=src python benchmarks/eager_step_time.py            # GPU: the embedded model
    python benchmarks/eager_step_time.py --smoke                   # CPU: tiny random llama, no timing claims

At batch 1 an eager step of the embedded model is host work: ~1,250 kernels whose launches take longer than
they run, and the host's speed drifted by up to 2x between runs on the H200's machine. So the rows are
timed in ``--rounds`` alternating rounds (each a prefill, ``--warmup`` and ``--steps`` timed steps) and the
median round is reported with every round. ``--random`` builds SmolLM2-135M's shape (30 layers, GQA 9/3 x 64)
with random weights, which times the same launches with no model file: a step's time does not depend on the
weights. Writes ``benchmarks/results/eager_step_time.json`` (``--smoke``: the temp folder).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import machine  # sibling script
from cuda_graph_decode import (  # sibling scripts
    CONFIGS,
    build_source,
    result_path,
    save_result,
    step_model,
)
from generate_throughput import next_token, sync
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.cache.protocol import decode_backends

CONTEXTS = {"wrapped": True, "plain": False}


def time_steps(model, prompt: torch.Tensor, cache_name: str, wrapped: bool, args) -> float:
    """ms per step of ``args.steps`` greedy steps after a prefill and ``args.warmup`` steps."""
    device = model.device
    cache = build_source(model, cache_name, args.budget, args.residual)
    try:
        with torch.inference_mode():
            token = next_token(model, cache, prompt.to(device), logits_to_keep=1)
            with decode_backends(device) if wrapped else contextlib.nullcontext():
                for _ in range(args.warmup):
                    token = next_token(model, cache, token)
                sync(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    token = next_token(model, cache, token)
                sync(device)
        return (time.perf_counter() - start) / args.steps * 1e3
    finally:
        if isinstance(cache, CompressedCache):
            cache.close()


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", default=None, help="default: $PYRAMIDKV_MODEL, else the embedded model")
    add("--random", action="store_true", help="SmolLM2-shaped random weights (GPU), no model file")
    add("--prompt", type=int, default=8000, help="prompt tokens")
    add("--caches", default="full,pyramidkv", help=f"comma-separated, of {', '.join(CONFIGS)}")
    add(
        "--contexts",
        default="wrapped,plain",
        help="decode inside decode_backends (wrapped), or not",
    )
    add("--budget", default="10%", help="pyramidkv's average budget per layer")
    add("--residual", type=int, default=64, help="fp16 recent window of the caches with codes")
    add("--steps", type=int, default=30, help="timed decode steps per round")
    add("--warmup", type=int, default=5, help="untimed decode steps before them")
    add("--rounds", type=int, default=4, help="alternating rounds over the rows")
    add("--out", default=None, help="folder; default benchmarks/results (smoke: the temp folder)")
    add("--smoke", action="store_true", help="CPU check: tiny random llama, prompt 64, 2 rounds")
    args = parser.parse_args(argv)
    for name in ("prompt", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: got {getattr(args, name)}; expected at least 1")
    if args.warmup < 0:
        parser.error(f"--warmup: got {args.warmup}; expected at least 0")
    for name, known in (("caches", CONFIGS), ("contexts", CONTEXTS)):
        picked = getattr(args, name).split(",")
        if not picked or any(p not in known for p in picked):
            parser.error(
                f"--{name}: got {getattr(args, name)!r}; expected some of {', '.join(known)}"
            )
        setattr(args, name, picked)
    if args.random and not torch.cuda.is_available():
        parser.error("--random: needs a CUDA device (use --smoke on a CPU)")
    if args.smoke:
        args.prompt, args.steps, args.warmup, args.rounds = 64, 3, 1, 2
    return args


def main(argv=None) -> dict:
    args = arguments(argv)
    model, prompt, name, _ = step_model(args, 1)
    device = model.device
    rows = [
        dict(cache=cache, wrapped=CONTEXTS[context], rounds_ms=[])
        for cache in args.caches
        for context in args.contexts
    ]
    for _ in range(args.rounds):
        for row in rows:
            row["rounds_ms"].append(time_steps(model, prompt, row["cache"], row["wrapped"], args))
    for row in rows:
        row["ms_per_step"] = statistics.median(row["rounds_ms"])
        context = "whole decode in decode_backends" if row["wrapped"] else "no outer context"
        rounds = ", ".join(f"{ms:.2f}" for ms in row["rounds_ms"])
        print(f"{row['cache']:>18}, {context:<31}: {row['ms_per_step']:7.2f} ms/step ({rounds})")
    question = (
        "eager decode step at batch 1: the full cache vs compressed caches, with and without the decode "
        "wrapped in decode_backends"
    )
    record = {
        **machine.header(question, "eager_step_time.py", argv, device),
        "model": name,
        "prompt": args.prompt,
        "budget": args.budget,
        "residual": args.residual,
        "steps": args.steps,
        "rows": rows,
    }
    save_result(record, result_path("eager_step_time", args))
    return record


if __name__ == "__main__":
    main()
