"""What one CUDA-graph replay of a decode step is made of: kernels per step and their device time, per cache.

A decode step of the embedded model is bound by its launches, not its bytes (benchmarks/README.md): under a
CUDA graph the host is gone, but every small kernel still costs the GPU a few microseconds. For each cache
(as benchmarks/cuda_graph_decode.py builds it: prefill, static copy, :class:`DecodeStep` captured with
:func:`pyramidkv.static.graph.capture`) this replays the graph ``--replays`` times under the CUDA profiler and
reports the kernels per replay, their summed device time and the costliest kernels.

    PYTHONPATH=src python benchmarks/graph_step_profile.py     # GPU: full and pyramidkv 10% + fibquant:2
    python benchmarks/graph_step_profile.py --smoke            # CPU: tiny random llama, eager step, aten ops

With ``--smoke`` (no CUDA) the step runs eagerly and the CPU profiler's aten operations stand in for kernels.
Writes ``benchmarks/results/graph_step_profile.json`` (``--smoke``: the temp folder).
"""

from __future__ import annotations

import argparse
import collections

import torch

import machine  # sibling script
from cuda_graph_decode import (  # sibling script
    CONFIGS,
    prefill,
    result_path,
    save_result,
    step_model,
)
from pyramidkv.static.cache import DecodeStep, StaticCompressedCache
from pyramidkv.static.graph import WARMUP, capture


def profile_step(model, prompts: torch.Tensor, config: str, args) -> dict:
    """Kernels (CUDA: device kernels of graph replays; CPU: aten operations of eager steps) per step."""
    cuda = model.device.type == "cuda"
    with torch.inference_mode():
        source, first = prefill(model, prompts, config, args.batch, args)
        static = StaticCompressedCache(model, source, WARMUP + args.replays + 4)
        del source
        step = DecodeStep(model, static)
        if cuda:
            graph, _, _ = capture(step, static, first)
            run = graph.replay
        else:
            step.input_ids.copy_(first)
            run = step
        for _ in range(2):
            run()
        activity = (
            torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
        )
        with torch.profiler.profile(activities=[activity]) as prof:
            for _ in range(args.replays):
                run()
            if cuda:
                torch.cuda.synchronize(model.device)
        static.close()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    count, micros = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == kind and (cuda or event.name.startswith("aten::")):
            count[event.name] += 1
            micros[event.name] += event.device_time_total if cuda else event.self_cpu_time_total
    top = [
        dict(name=name, per_step=count[name] / args.replays, us_each=us / count[name])
        for name, us in micros.most_common(args.top)
    ]
    return dict(
        config=config,
        batch=args.batch,
        kernels_per_step=sum(count.values()) / args.replays,
        kernel_ms_per_step=sum(micros.values()) / args.replays / 1e3,
        top=top,
    )


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", default=None, help="default: $PYRAMIDKV_MODEL, else the embedded model")
    add(
        "--configs",
        default="full,pyramidkv+fibquant",
        help=f"comma-separated, of {', '.join(CONFIGS)}",
    )
    add("--batch", type=int, default=1)
    add("--prompt", type=int, default=8000, help="prompt tokens per row")
    add("--budget", default="10%", help="pyramidkv's average budget per layer")
    add("--residual", type=int, default=64, help="fp16 window of the caches with codes, tokens")
    add("--replays", type=int, default=5, help="profiled steps")
    add("--top", type=int, default=12, help="costliest kernels reported")
    add("--out", default=None, help="folder; default benchmarks/results (smoke: the temp folder)")
    add("--smoke", action="store_true", help="CPU check: tiny random llama, prompt 64, eager steps")
    args = parser.parse_args(argv)
    args.configs = args.configs.split(",")
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; expected some of {', '.join(CONFIGS)}")
    for name in ("batch", "prompt", "replays", "residual"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: got {getattr(args, name)}; expected at least 1")
    args.prefill_rows = 1
    if args.smoke:
        args.prompt = 64
    return args


def main(argv=None) -> dict:
    args = arguments(argv)
    model, prompts, name, _ = step_model(args, 1)
    device = model.device
    question = "kernels per decode step (CUDA-graph replay) and their device time, per cache"
    record = {
        **machine.header(question, "graph_step_profile.py", argv, device),
        "model": name,
        "prompt": args.prompt,
        "rows": [],
    }
    for config in args.configs:
        row = profile_step(model, prompts, config, args)
        record["rows"].append(row)
        unit = "kernels" if device.type == "cuda" else "aten ops"
        print(
            f"{config} batch {args.batch}: {row['kernels_per_step']:.0f} {unit} per step, "
            f"{row['kernel_ms_per_step']:.3f} ms"
        )
        for kernel in row["top"]:
            print(
                f"  {kernel['per_step']:6.0f} x {kernel['us_each']:8.2f} us  {kernel['name'][:90]}"
            )
    save_result(record, result_path("graph_step_profile", args))
    return record


if __name__ == "__main__":
    main()
