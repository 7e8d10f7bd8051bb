"""Device time of each kernel in one decode-attention call, from the CUDA profiler (CUPTI via torch.profiler).

``decode_attention.py`` times a whole call with CUDA events after an L2 flush: with the GPU idle, that
includes the host's time to enqueue it (query rotation, workspace, launch, merge: ~0.4 ms measured at small
sizes). This script separates the two: it runs the call back to back ``--reps`` times under the profiler and
reports, per kernel name, the mean device time per call, next to SDPA over the same cache in bf16. At the
headline size (570 MB of codes at 2 bits) the L2 (60 MB) holds nothing across calls.

    python benchmarks/decode_kernel_time.py --heads 32/8x128 --batch 8 --context 128k --bits 2,3,4
    python benchmarks/decode_kernel_time.py --codec turboquant --triton   # TurboQuant on the Triton kernel
    python benchmarks/decode_kernel_time.py --bits 1.5,2.5,3.5            # FibQuant's fractional rates
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import machine  # sibling script
from decode_attention import (
    bytes_of,
    make_codecs,
    parse_heads,
    parse_rates,
    parse_sizes,
    random_codes,
)
from pyramidkv.kernels.dispatch import fibquant_decode_attention

RESULTS = Path(__file__).parent / "results"


def profile(call, reps: int) -> dict[str, float]:
    """Mean device milliseconds per call of every kernel ``call`` launches, by kernel name."""
    call()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    total: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total[event.name] += event.device_time / 1e3
    return {name: ms / reps for name, ms in sorted(total.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default="32/8x128")
    parser.add_argument("--batch", default="8")
    parser.add_argument("--context", default="128k")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument(
        "--codec",
        default="fibquant",
        help="fibquant, turboquant, uniform, or keys/values (uniform/fibquant); comma-separated",
    )
    parser.add_argument(
        "--triton",
        action="store_true",
        help="the Triton kernel, not the CUDA mma kernel where it reads the codes",
    )
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "decode_kernel_time_cuda.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (the profiler reads device kernel times)")
    device = torch.device("cuda")
    rows = []
    for (q_heads, kv_heads, dim), batch, context in (
        (h, b, c)
        for h in parse_heads(args.heads)
        for b in parse_sizes(args.batch, "batch")
        for c in parse_sizes(args.context, "context")
    ):
        gen = torch.Generator(device=device).manual_seed(0)
        query = torch.randn(batch, q_heads, 1, dim, device=device, generator=gen).bfloat16()
        kv = torch.randn(2, batch, kv_heads, context, dim, device=device, generator=gen).bfloat16()
        sdpa = profile(
            lambda q=query, kv=kv: F.scaled_dot_product_attention(q, kv[0], kv[1], enable_gqa=True),
            args.reps,
        )
        del kv
        for name, bits in itertools.product(args.codec.split(","), parse_rates(args.bits, "bits")):
            codecs = make_codecs(name, dim, bits)
            codes = [random_codes(c, (batch, kv_heads, context), gen) for c in codecs]
            kernels = profile(
                lambda q=query, c=codecs, codes=codes, scale=dim**-0.5: fibquant_decode_attention(
                    q, *codes, *c, scale, mma=not args.triton
                ),
                args.reps,
            )
            main_name = max(kernels, key=kernels.get)
            row = dict(heads=f"{q_heads}/{kv_heads}", dim=dim, batch=batch, context=context,
                       codec=name, bits=bits, k=codecs[0].k, n=codecs[0].n, sdpa_ms=sum(sdpa.values()),
                       decode_kernel=main_name, decode_kernel_ms=kernels[main_name],
                       all_kernels_ms=sum(kernels.values()), kernels=kernels)  # fmt: skip
            row["bytes_read"] = bytes_of(codes)
            row["kernel_gbps"] = row["bytes_read"] / row["decode_kernel_ms"] / 1e6
            row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["all_kernels_ms"]
            rows.append(row)
            print(f"{row['heads']}x{dim} b{batch} {context} {name} {bits}-bit: {main_name} "
                  f"{row['decode_kernel_ms']:.3f} ms ({row['kernel_gbps']:.0f} GB/s), all kernels "
                  f"{row['all_kernels_ms']:.3f} ms, SDPA {row['sdpa_ms']:.3f} ms", flush=True)  # fmt: skip
            del codes
            torch.cuda.empty_cache()
    return write_record(
        "device time per kernel of one decode-attention call (no host time), vs SDPA",
        "decode_kernel_time.py", argv, rows, args.out,
    )  # fmt: skip


def write_record(question: str, script: str, argv: list[str] | None, rows: list, out: str) -> dict:
    """The profiler benchmarks' JSON record (question, date, machine, the command that made it, rows),
    written to ``out``."""
    device = torch.device("cuda", torch.cuda.current_device())
    record = {**machine.header(question, script, argv, device), "rows": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
