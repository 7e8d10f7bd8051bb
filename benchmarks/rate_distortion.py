"""Rate-distortion of the codecs: FibQuant against TurboQuant-mse, the Shannon bound and TurboQuant's bound.

Part ``source``: the canonical source (uniform unit vectors in R^d, d = 64 and 128). Distortion is the
normalised MSE D = E||u - u_hat||^2 = d x (MSE per coordinate), on which the Shannon lower bound is 4^-rate
and TurboQuant's upper bound (sqrt(3) pi / 2) 4^-b (Zandieh et al. 2025, arXiv 2504.19874). Also measures
CPU encode/decode throughput at d = 64, 2 bits.

Part ``model``: the real keys and values of the embedded model after one prefill of real prose. Per layer, the
raw MSE per coordinate of keys and values, and the FibQuant paper's metric (arXiv 2605.11478): the cosine
between softmax(q K^T / sqrt d) V with true and with reconstructed K and V, for the last queries of the
context. Against the compression ratio vs fp16, norms and scales included; writes a frontier plot.

    python benchmarks/rate_distortion.py --part source
    python benchmarks/rate_distortion.py --part model --tokens 2048 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import machine  # sibling script
from pyramidkv.codecs import KIVI, Codec, FibQuant, TurboQuant
from pyramidkv.codecs.describe import TURBOQUANT_BOUND, source_distortion, turboquant_distortion
from rate_distortion_model import plot_frontier, print_model_tables, run_model

RESULTS = Path(__file__).parent / "results"
FIBQUANT_BLOCKS = [
    (2, 4),
    (2, 16),
    (2, 64),
    (2, 256),
    (4, 8),
    (4, 16),
    (4, 64),
    (4, 256),
    (8, 16),
    (8, 64),
    (8, 256),
]


def _row(name: str, codec: FibQuant | TurboQuant, vectors: int) -> dict:
    d, rate = codec.d, codec.rate
    mse = source_distortion(codec, vectors)
    return {
        "codec": name,
        "d": d,
        "k": codec.k,
        "n": codec.n,
        "rate": rate,
        "stored_bits_per_coordinate": codec.bits_per_coordinate(include_norm=True),
        "normalized_mse": mse,
        "mse_per_coordinate": mse / d,
        "shannon_bound": 4.0**-rate,
        "turboquant_bound": TURBOQUANT_BOUND * 4.0**-rate,
        "turboquant_exact_at_rate": turboquant_distortion(d, round(rate))
        if float(rate).is_integer()
        else None,
    }


def _throughput(codec: Codec, x: torch.Tensor, repeats: int) -> dict:
    def best(run) -> float:
        run()  # warm-up: device copies, allocator
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    codes = codec.encode(x)
    encode, decode = best(lambda: codec.encode(x)), best(lambda: codec.decode(codes))
    return {"encode_vectors_per_s": len(x) / encode, "decode_vectors_per_s": len(x) / decode}


def run_source(args: argparse.Namespace) -> dict:
    """Distortion against rate on the canonical source, then CPU throughput."""
    rows = []
    for d in args.dims:
        rows += [_row("TurboQuant", TurboQuant(d, b), args.vectors) for b in (1, 2, 3, 4)]
        rows += [
            _row("FibQuant", FibQuant(d, k, n), args.vectors)
            for k, n in FIBQUANT_BLOCKS
            if d % k == 0
        ]
    x = torch.randn(args.throughput_vectors, 64, generator=torch.Generator().manual_seed(0))
    speed = {
        "FibQuant k=4 N=256": _throughput(FibQuant(64, bits=2), x, args.repeats),
        "FibQuant k=2 N=16": _throughput(FibQuant(64, 2, 16), x, args.repeats),
        "TurboQuant b=2": _throughput(TurboQuant(64, 2), x, args.repeats),
        "KIVI int2 per-token g=32": _throughput(KIVI(2, 32, "token"), x, args.repeats),
    }
    meta = {
        "vectors": args.vectors,
        "distortion": "normalized_mse = E||u - u_hat||^2 over unit vectors u = d x mse_per_coordinate",
        "shannon_bound": "4^-rate",
        "turboquant_bound": f"sqrt(3) pi / 2 x 4^-rate = {TURBOQUANT_BOUND:.4f} x 4^-rate",
    }
    return {"rows": rows, "throughput_cpu_d64_2bit": speed, "meta": meta}


def print_source_tables(result: dict, console: Console) -> None:
    table = Table(
        title="Rate-distortion on the canonical source (D = E||u - u_hat||^2, unit vectors)"
    )
    for column in (
        "codec",
        "d",
        "k",
        "N",
        "rate",
        "stored b/c",
        "D",
        "TQ at rate",
        "Shannon 4^-b",
        "TQ bound",
    ):
        table.add_column(column, justify="right")
    for row in sorted(
        result["rows"], key=lambda r: (r["d"], r["rate"], r["codec"] != "TurboQuant", r["k"])
    ):
        exact = row["turboquant_exact_at_rate"]
        table.add_row(
            row["codec"],
            str(row["d"]),
            str(row["k"]),
            str(row["n"]),
            f"{row['rate']:.3g}",
            f"{row['stored_bits_per_coordinate']:.3g}",
            f"{row['normalized_mse']:.4f}",
            "-" if exact is None else f"{exact:.4f}",
            f"{row['shannon_bound']:.4f}",
            f"{row['turboquant_bound']:.4f}",
        )
    console.print(table)
    speed = Table(title=f"CPU throughput, d = 64, 2 bits ({torch.get_num_threads()} threads)")
    for column in ("codec", "encode vectors/s", "decode vectors/s"):
        speed.add_column(column, justify="right")
    for name, value in result["throughput_cpu_d64_2bit"].items():
        speed.add_row(
            name, f"{value['encode_vectors_per_s']:,.0f}", f"{value['decode_vectors_per_s']:,.0f}"
        )
    console.print(speed)


# ---- part model: real keys and values of the embedded model --------------------------------------------

# (k, N) for rates 0.125 .. 5 bits: choose_block's pick (the largest block with N <= 256, else the smallest N),
# but k = 4, N = 4096 at 3 bits, where cosine 0.95 is crossed. Larger blocks elsewhere (k = 8, N = 4096 at 1.5
# bits; k = 4, N = 1024 at 2.5; k = 2, N = 4096 at 6) each add 0.5 to 1.5 minutes on 2 idle cores
PARTS = {"source": (run_source, print_source_tables), "model": (run_model, print_model_tables)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), default="source")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--vectors", type=int, default=20000, help="fresh unit vectors per distortion"
    )
    parser.add_argument("--throughput-vectors", type=int, default=1 << 16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tokens", type=int, default=2048, help="model part: context length (tokens of prose)"
    )
    parser.add_argument(
        "--queries", type=int, default=64, help="model part: last queries scored per layer"
    )
    parser.add_argument(
        "--model", default=None, help="model part: model (default: the embedded SmolLM2)"
    )
    parser.add_argument("--seed", type=int, default=0, help="model part: paragraph order")
    parser.add_argument("--kivi-group", type=int, default=32, help="model part: KIVI group size")
    parser.add_argument("--plot", type=Path, default=RESULTS / "rate_distortion_frontier.png")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/rate_distortion_<part>.json"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run, show = PARTS[args.part]
    result = run(args)
    result["meta"] = {
        "part": args.part,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine.describe("cpu"),
        **result.get("meta", {}),
    }
    out = args.out or RESULTS / f"rate_distortion_{args.part}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    show(result, Console(width=140))
    print(f"wrote {out}")
    if args.part == "model":
        plot_frontier(result, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
