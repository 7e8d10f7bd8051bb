"""Encode speed: the fused Triton encoder against the torch encoder, per codec and head dim (issue 7).

Encoding runs once per prompt (every kept token of every layer) and at every flush of the fp16 window, so it
sits on the prefill's critical path. Times ``codec.encode(x)`` (torch: rotate, score matrix, argmin, pack)
and :func:`pyramidkv.kernels.encode.fused_encode` on the same random bf16 vectors, and the share of
indices the two agree on (they differ only at cell borders).

    python benchmarks/encode_speed.py                    # GPU -> results/encode_speed_cuda.json
    python benchmarks/encode_speed.py --vectors 4096     # a quick look (CPU: the interpreter, slow)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pyramidkv.codecs import FibQuant, TurboQuant
from pyramidkv.kernels.encode import fused_encode

RESULTS = Path(__file__).parent / "results"
CODECS = {
    "fibquant:2": lambda d: FibQuant(d, bits=2),
    "fibquant:3": lambda d: FibQuant(d, bits=3),
    "fibquant:4": lambda d: FibQuant(d, bits=4),
    "turboquant:2": lambda d: TurboQuant(d, 2),
}


def _timed(fn, device: torch.device, reps: int) -> float:
    """Median wall seconds of ``fn()`` after one warm-up call, synchronising the device."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--vectors", type=int, default=8 * 8 * 8192, help="vectors encoded per call"
    )
    parser.add_argument("--dims", default="128,64")
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", help="JSON path (default results/encode_speed_<device>.json)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    print(
        f"{'codec':<14}{'d':>5}{'vectors':>10}{'torch ms':>11}{'fused ms':>11}{'speed-up':>10}{'agree':>9}"
    )
    for dim in map(int, args.dims.split(",")):
        torch.manual_seed(0)
        x = torch.randn(args.vectors, dim, device=device, dtype=torch.bfloat16)
        for name in args.codecs.split(","):
            codec = CODECS[name](dim)
            torch_s = _timed(lambda codec=codec, x=x: codec.encode(x), device, args.reps)
            fused_s = _timed(lambda codec=codec, x=x: fused_encode(codec, x), device, args.reps)
            agree = float(
                (codec.unpack(codec.encode(x)) == codec.unpack(fused_encode(codec, x)))
                .float()
                .mean()
            )
            row = dict(codec=name, dim=dim, k=codec.k, n=codec.n, vectors=args.vectors,
                       torch_ms=torch_s * 1e3, fused_ms=fused_s * 1e3, speedup=torch_s / fused_s,
                       index_agreement=agree, fused_vectors_per_s=args.vectors / fused_s)  # fmt: skip
            rows.append(row)
            print(f"{name:<14}{dim:>5}{args.vectors:>10}{row['torch_ms']:>11.2f}{row['fused_ms']:>11.2f}"
                  f"{row['speedup']:>10.1f}{agree:>9.4f}")  # fmt: skip
    out = Path(args.out) if args.out else RESULTS / f"encode_speed_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        date=datetime.date.today().isoformat(),
        machine=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        command=shlex.join([Path(sys.executable).name, *sys.argv]),
    )
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
