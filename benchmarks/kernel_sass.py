"""Static SASS report of the decode kernel for the H200 (sm_90), built on a machine without a GPU.

The GPU is lent for minutes at a time; what a variant costs in registers, spills, shared memory and
instructions can be read before that from the cubin Triton builds for sm_90 with its bundled ptxas
(:mod:`tools.offline_compile`). For the headline shape (32/8 heads x 128: 4 query rows per KV
head, d = 128) and the embedded model's (9/3 x 64: 3 rows, d = 64), FibQuant at 2/3/4 bits, shared-memory
gathers of flat entries (GATHER 1) or packed codewords (GATHER 2), tiles of 32/64 tokens and 4/8 warps:
registers per thread, local memory (spills), shared bytes, and per variant the instruction classes that
bound the kernel: local loads and stores (LDL, STL: spills), global loads (LDG, LDGSTS), shared loads
(LDS, LDSM), shared stores (STS, STSM) and tensor-core HMMA, out of the whole listing (static counts: a
loop body counts once).

    python benchmarks/kernel_sass.py            # CPU or GPU, a few minutes -> results/kernel_sass.json
    python benchmarks/kernel_sass.py --smoke    # one variant -> results/kernel_sass_smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import shlex
import sys
from pathlib import Path

import triton

from pyramidkv.codecs.fibquant import choose_block
from pyramidkv.kernels.plan import DecodeTuning

# the development tools live beside the package, not in it: put the repository root on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import offline_compile as oc

RESULTS = Path(__file__).parent / "results"
KERNEL = "pyramidkv.kernels.triton_decode:_decode_split_kernel"
CLASSES = {  # column -> SASS mnemonic roots (the part before the first dot) it counts
    "ldg": ("LDG", "LDGSTS"),
    "lds": ("LDS", "LDSM"),
    "sts": ("STS", "STSM"),
    "hmma": ("HMMA",),
    "local": ("LDL", "STL"),  # local memory: the spill traffic, where spill > 0
}
COLUMNS = (
    "heads", "bits", "gather", "block", "warps", "regs", "spill", "shared",
    "local", "ldg", "lds", "sts", "hmma", "total",
)  # fmt: skip


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"32/8x128"`` -> (query heads, KV heads, head dim)."""
    try:
        heads, dim = text.split("x")
        q_heads, kv_heads = map(int, heads.split("/"))
        shape = (q_heads, kv_heads, int(dim))
    except ValueError:
        shape = None
    if shape is None or min(shape) < 1 or q_heads % kv_heads:
        raise argparse.ArgumentTypeError(
            f"a shape is q_heads/kv_heads x head_dim with kv_heads dividing q_heads, e.g. 32/8x128; got {text!r}"
        )
    return shape


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def variants(args: argparse.Namespace) -> list[dict]:
    """One row (without measurements) per point of the grid."""
    grid = itertools.product(args.shapes, args.bits, args.gather, args.blocks, args.warps)
    rows = []
    for (q_heads, kv_heads, d), bits, gather, block, warps in grid:
        k, n = choose_block(d, bits)
        config = oc.DecodeConfig(d=d, k=k, n=n, rows=q_heads // kv_heads, block=block,
                                 gather=gather, float_type=args.float_type)  # fmt: skip
        rows.append(dict(heads=f"{q_heads}/{kv_heads}x{d}", bits=bits, k=k, n=n, gather=gather,
                         block=block, warps=warps, config=config))  # fmt: skip
    return rows


def measure(rows: list[dict], num_stages: int) -> None:
    """Compile every row's variant (one isolated process) and add its resources and instruction counts."""
    jobs = [dict(kernel=KERNEL, args=oc.decode_args(r["config"]), num_warps=r["warps"],
                 num_stages=num_stages) for r in rows]  # fmt: skip
    for row, (report, error) in zip(rows, oc.run_isolated(oc.compile_report, jobs), strict=True):
        if error is not None:
            raise RuntimeError(f"{row['heads']} {row['bits']} bits: the compile failed:\n{error}")
        row |= dict(regs=report.registers, spill=report.spill_bytes, shared=report.shared_bytes,
                    total=report.total, instructions=dict(report.instructions.most_common()))  # fmt: skip
        row |= {name: report.count(*roots) for name, roots in CLASSES.items()}
        del row["config"]


def table(rows: list[dict]) -> str:
    lines = ["".join(f"{c:>10}" for c in COLUMNS)]
    lines += ["".join(f"{row[c]!s:>10}" for c in COLUMNS) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    tuning = DecodeTuning()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=lambda s: [parse_shape(v) for v in s.split(",")],
                        default=[(32, 8, 128), (9, 3, 64)])  # fmt: skip
    parser.add_argument("--bits", type=_ints, default=[2, 3, 4])
    parser.add_argument("--gather", type=_ints, default=[1, 2])
    parser.add_argument("--blocks", type=_ints, default=[32, 64])
    parser.add_argument("--warps", type=_ints, default=[4, 8])
    parser.add_argument("--float-type", default="fp16", choices=sorted(oc.FLOAT_TYPES))
    parser.add_argument("--smoke", action="store_true", help="one variant: the default tuning")
    parser.add_argument("--out", help="JSON path (default results/kernel_sass[_smoke].json)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes, args.bits, args.gather = args.shapes[:1], args.bits[:1], [tuning.gather_mode()]
        args.blocks, args.warps = [tuning.block], [tuning.num_warps]
    rows = variants(args)
    measure(rows, tuning.num_stages)
    print(table(rows))
    name = "kernel_sass_smoke.json" if args.smoke else "kernel_sass.json"
    out = Path(args.out) if args.out else RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        date=datetime.date.today().isoformat(),
        command=shlex.join(
            ["python", "benchmarks/kernel_sass.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        triton=triton.__version__,
        target=f"{oc.SM90.backend} sm_{oc.SM90.arch}",
        float_type=args.float_type,
        num_stages=tuning.num_stages,
        classes=CLASSES,
        notes="regs per thread; spill = local memory bytes per thread (STACK + LOCAL); shared = bytes "
        "the launch requests; instruction counts are static (the SASS listing), not executed",
    )
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
