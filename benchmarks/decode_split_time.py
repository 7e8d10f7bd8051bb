"""Device time of the decode kernel and the epilogue by split: where the default split sits against the best.

A layer's codes path is two launches: the decode kernel, whose blocks each read one range of the sequence
(a split), and the epilogue, which merges the splits with the recent window and rotates back
(``kernels/epilogue.py``). More splits shorten the kernel where its blocks do not fill the GPU (small
batches) and lengthen the merge, so the best split depends on how cheap the merge is: this script times
both, under the CUDA profiler, for every split of ``--splits`` up to the one that still runs in one wave
("one-wave"), and marks the default (``cuda_decode.mma_split``) and the least total.

    python benchmarks/decode_split_time.py --heads 9/3x64,32/8x128 --batch 1 --context 8k,32k,128k
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from decode_attention import make_codec, parse_heads, parse_sizes, random_codes
from decode_kernel_time import profile, write_record
from pyramidkv.kernels import cuda_decode
from pyramidkv.kernels.dispatch import launch_partials
from pyramidkv.kernels.epilogue import decode_epilogue
from pyramidkv.kernels.plan import DEFAULT_TUNING, make_workspace, plan_block, rotate_query

RESULTS = Path(__file__).parent / "results"
WINDOW = 64  # recent-window tokens the epilogue attends over


def time_splits(
    heads: tuple[int, int, int], batch: int, context: int, args: argparse.Namespace
) -> list[dict]:
    """Rows of one case: kernel, epilogue and all device microseconds per call, by split."""
    q_heads, kv_heads, dim = heads
    device, tuning = torch.device("cuda"), DEFAULT_TUNING
    gen = torch.Generator(device=device).manual_seed(0)
    codec = make_codec("fibquant", dim, args.bits)
    codes_k, codes_v = (random_codes(codec, (batch, kv_heads, context), gen) for _ in "kv")
    query = torch.randn(batch, q_heads, 1, dim, device=device, generator=gen).bfloat16()
    window = torch.randn(batch, kv_heads, WINDOW, dim, device=device, generator=gen).bfloat16()
    group = q_heads // kv_heads
    kernel, default = plan_block(codes_k.shape, codec, codec, group, tuning, device)
    if kernel is None:
        raise SystemExit(f"{q_heads}/{kv_heads}x{dim}: the mma kernel does not read these codes")
    wave = cuda_decode.one_wave_split(codes_k.shape, device, kernel)
    rotation = codec.tensors(device, torch.float32)[0]
    rows = []
    for split in sorted(
        s for s in {default, wave, *parse_sizes(args.splits, "splits")} if s <= wave
    ):
        workspace = make_workspace(batch, kv_heads, group, split, dim, device)

        def call(split: int = split, workspace: tuple = workspace) -> torch.Tensor:
            q_rot = rotate_query(query, codec, dim**-0.5, kv_heads, tuning.codebook_dtype)
            launch_partials(
                q_rot, codes_k, codes_v, codec, codec, None, workspace, 0, split, tuning, kernel
            )
            return decode_epilogue(workspace, rotation, query, window, window, dim**-0.5)

        times = profile(call, args.reps)
        rows.append(dict(heads=f"{q_heads}/{kv_heads}", dim=dim, batch=batch, context=context, bits=args.bits,
                         split=split, default=split == default, one_wave=split == wave,
                         kernel_us=1e3 * sum(v for k, v in times.items() if "mma" in k or "decode_split" in k),
                         epilogue_us=1e3 * sum(v for k, v in times.items() if "epilogue" in k),
                         all_us=1e3 * sum(times.values())))  # fmt: skip
    best = min(rows, key=lambda r: r["all_us"])
    for row in rows:
        row["least"] = row is best
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default="9/3x64,32/8x128")
    parser.add_argument("--batch", default="1")
    parser.add_argument("--context", default="8k,32k,128k")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument(
        "--splits", default="2,4,8,16,32,64", help="besides the default and one-wave"
    )
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=str(RESULTS / "decode_split_time.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (the profiler reads device kernel times)")
    rows = []
    for heads in parse_heads(args.heads):
        for batch in parse_sizes(args.batch, "batch"):
            for context in parse_sizes(args.context, "context"):
                case = time_splits(heads, batch, context, args)
                rows += case
                least = next(r for r in case if r["least"])
                print(f"{heads[0]}/{heads[1]}x{heads[2]} b{batch} {context}: " + "  ".join(
                    f"s{r['split']}{'*' if r['default'] else ''}: {r['kernel_us']:.1f}+{r['epilogue_us']:.1f}"
                    f"={r['all_us']:.1f}" for r in case) + f"  (least s{least['split']})", flush=True)  # fmt: skip
                torch.cuda.empty_cache()
    return write_record(
        "decode kernel + epilogue device time by split; the default (*) against the least",
        "decode_split_time.py", argv, rows, args.out,
    )  # fmt: skip


if __name__ == "__main__":
    main()
