"""How long does the host take to enqueue one layer's attention over codes? Microseconds per call of
:func:`pyramidkv.kernels.dispatch.fused_attention` (query rotation, launch plans, split workspace, the decode
kernel over each coded block, the epilogue) on a prefilled cache, against one small torch operation timed the
same way in the same process.

    PYTHONPATH=src python benchmarks/decode_host_time.py --random   # GPU: SmolLM2-shaped random weights
    python benchmarks/decode_host_time.py --smoke                   # CPU: tiny llama, Triton's interpreter

An eager decode step of a small model at batch 1 is host work (benchmarks/README.md), and this call runs in
every layer of every step: its enqueue time, not the kernels' device time, is what it adds to a step. The
host's speed drifts between processes (by up to 1.5x on the H200's machine), so every repeat also times
``x.add_(1)``, a single-launch torch operation, and the ratio of the two is what compares runs and trees
(``PYTHONPATH=<another tree>/src``). The cache decodes ``--warmup`` steps first, so a layer holds both of its
blocks (the ragged prompt, the generated codes) as in a long generation. Writes
``benchmarks/results/decode_host_time.json`` (``--smoke``: the temp folder; ``--label`` names a variant).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

# without CUDA the Triton kernels run in Triton's interpreter, which must be chosen before triton is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import machine  # sibling script
from cuda_graph_decode import build_source, result_path, save_result, step_model  # sibling scripts
from generate_throughput import next_token, sync

CACHES = ("fibquant", "pyramidkv+fibquant")


def per_call_us(action, calls: int, device: torch.device) -> float:
    """Host microseconds per call of ``action`` over ``calls`` calls, from an idle device."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        action()
    elapsed = time.perf_counter() - start
    sync(device)
    return elapsed / calls * 1e6


def measure(model, prompt: torch.Tensor, cache_name: str, args) -> dict:
    """The call's and the calibration's us per call, ``args.repeats`` times each, alternating."""
    from pyramidkv.kernels.dispatch import fused_attention

    device = model.device
    cache = build_source(model, cache_name, args.budget, args.residual)
    try:
        with torch.inference_mode():
            token = next_token(model, cache, prompt.to(device), logits_to_keep=1)
            for _ in range(args.warmup):
                token = next_token(model, cache, token)
            layer = cache.layers[min(args.layer, len(cache.layers) - 1)]
            config = model.config
            query = torch.randn(
                prompt.shape[0], config.num_attention_heads, 1, layer.keys.shape[-1],
                dtype=layer.keys.dtype, device=device,
            )  # fmt: skip
            scaling = layer.keys.shape[-1] ** -0.5
            scratch = torch.zeros(16, device=device)

            def call():
                fused_attention(query, layer.coded, layer.keys, layer.values, scaling)

            call()  # first use: compiles
            calls, calibration = [], []
            for _ in range(args.repeats):
                calls.append(per_call_us(call, args.calls, device))
                calibration.append(per_call_us(lambda: scratch.add_(1.0), args.calls, device))
    finally:
        cache.close()
    call_us, add_us = statistics.median(calls), statistics.median(calibration)
    return dict(
        cache=cache_name,
        blocks=len(layer.coded.blocks),
        call_us=call_us,
        add_us=add_us,
        call_over_add=call_us / add_us,
        repeats_call_us=calls,
        repeats_add_us=calibration,
    )


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", default=None, help="default: $PYRAMIDKV_MODEL, else the embedded model")
    add("--random", action="store_true", help="SmolLM2-shaped random weights (GPU), no model file")
    add("--caches", default=",".join(CACHES), help=f"comma-separated, of {', '.join(CACHES)}")
    add("--prompt", type=int, default=8000, help="prompt tokens")
    add("--budget", default="10%", help="pyramidkv's average budget per layer")
    add("--residual", type=int, default=64, help="fp16 recent window")
    add("--warmup", type=int, default=70, help="decode steps before timing (70: one flush at 64)")
    add("--layer", type=int, default=5, help="the layer whose call is timed")
    add("--calls", type=int, default=200, help="calls per timing")
    add("--repeats", type=int, default=7, help="timings of each, alternating; the median is kept")
    add("--label", default=None, help="suffix of the JSON's name (e.g. the tree timed)")
    add("--out", default=None, help="folder; default benchmarks/results (smoke: the temp folder)")
    add(
        "--smoke", action="store_true", help="CPU check: tiny llama, window 8, Triton's interpreter"
    )
    args = parser.parse_args(argv)
    for name in ("prompt", "calls", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: got {getattr(args, name)}; expected at least 1")
    for name in ("warmup", "layer"):
        if getattr(args, name) < 0:
            parser.error(f"--{name}: got {getattr(args, name)}; expected at least 0")
    args.caches = args.caches.split(",")
    if any(c not in CACHES for c in args.caches):
        parser.error(f"--caches: expected some of {', '.join(CACHES)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("the fused kernels need a CUDA device; use --smoke on a CPU")
    if args.smoke:
        args.prompt, args.warmup, args.calls, args.repeats, args.residual = 48, 20, 2, 2, 8
    return args


def main(argv=None) -> dict:
    args = arguments(argv)
    model, prompts, name, _ = step_model(args, 1)
    rows = [measure(model, prompts, cache, args) for cache in args.caches]
    for row in rows:
        print(
            f"{row['cache']:>18}: {row['call_us']:8.1f} us per call ({row['blocks']} blocks), "
            f"x.add_ {row['add_us']:6.1f} us, ratio {row['call_over_add']:5.1f}"
        )
    question = "host (enqueue) time of one layer's fused attention over codes, against one torch op"
    record = {
        **machine.header(question, "decode_host_time.py", argv, model.device),
        "model": name,
        "prompt": args.prompt,
        "warmup_steps": args.warmup,
        "layer": args.layer,
        "calls_per_timing": args.calls,
        "rows": rows,
    }
    save_result(record, result_path("decode_host_time", args, args.label))
    return record


if __name__ == "__main__":
    main()
