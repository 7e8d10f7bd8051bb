"""How long a prompt fits on the GPU: peak memory and prefill speed against prompt length, the full cache and
one-shot compression against chunked prefill.

    python benchmarks/prefill_memory.py --model random:smollm2 --lengths 32k,128k,512k
    python benchmarks/prefill_memory.py --model random:llama3-8b --lengths 32k,128k,256k,512k

Random weights of a real architecture (:mod:`shapes`) with RoPE stretched to the longest length, on random
token ids: memory and time depend on the shapes, not the weights. Each mode prefills each length once after a
warm-up at the first length, asking for the last position's logits only, as generation does:

* ``full``: one forward into transformers' ``DynamicCache``, the whole prompt's keys and values kept;
* ``oneshot``: one forward into ``CompressedCache(policy, budget)``, compressed when the forward ends (the
  default ``compress_after``: all layers at once below 1 GiB of prompt cache, layer by layer above);
* ``chunked``: ``CompressedCache(..., prefill_chunk=chunk)`` fed ``chunk`` tokens per forward, each chunk
  attending to the kept tokens plus itself and compressed back to the budget after it.

Per (mode, length): ``torch.cuda.max_memory_allocated`` over the prefill (weights, activations and caches
together), the cache's bytes afterwards, seconds and tokens per second; a length that runs out of memory is
recorded as such, and ``longest`` names the longest that fit per mode. Writes
benchmarks/results/prefill_memory_<shape>.json and a plot beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import machine  # sibling script
from pyramidkv import CompressedCache
from pyramidkv.cache.accounting import cache_nbytes, full_cache_nbytes
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.eval.results import write_json
from pyramidkv.eval.sweep import parse_lengths
from shapes import NAMES, random_model  # sibling script

RESULTS = Path(__file__).parent / "results"
MODES = ("full", "oneshot", "chunked")


def prefill(model, ids: torch.Tensor, mode: str, args) -> dict:
    """One prefill of ``ids`` in ``mode``: peak bytes, cache bytes, seconds; ``{"oom": True}`` when it ran out of
    device memory."""
    if mode == "full":
        cache, chunk = DynamicCache(config=model.config), ids.shape[1]
    else:
        chunk = args.chunk if mode == "chunked" else ids.shape[1]
        cache = CompressedCache(
            model,
            args.policy,
            args.budget,
            codec=args.codec,
            prefill_chunk=args.chunk if mode == "chunked" else None,
        )
    cuda = ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for piece in ids.split(chunk, dim=1):
                model(piece, logits_to_keep=1, **cache_kwargs(model, cache))
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return {
            "oom": False,
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "cache_bytes": cache_nbytes(cache),
            "seconds": seconds,
            "tokens_per_s": ids.shape[1] / seconds,
        }
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        if mode != "full":
            cache.close()
        del cache
        if cuda:
            torch.cuda.empty_cache()


def plot(record: dict, path: Path) -> None:
    """Peak memory against prompt length, one line per mode, the device's memory as a ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in record["modes"]:
        rows = [r for r in record["rows"] if r["mode"] == mode and not r["oom"]]
        ax.plot(
            [r["length"] for r in rows], [r["peak_bytes"] / 2**30 for r in rows], "o-", label=mode
        )
    ax.axhline(record["device_bytes"] / 2**30, color="grey", ls="--", label="device memory")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("peak GiB (weights + activations + cache)")
    ax.set_title(
        f"{record['model']}: {record['policy']} {record['budget']}, chunk {record['chunk']}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="random:smollm2", help="random:<shape> (smollm2, llama3-8b)"
    )
    parser.add_argument("--lengths", default="32k,128k,512k")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--budget", default="4096")
    parser.add_argument("--codec", default=None)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument(
        "--device", default="cuda", help="cuda; cpu only checks the script (no peak memory)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    shape = args.model.removeprefix("random:")
    lengths = parse_lengths(args.lengths)
    modes = args.modes.split(",")
    model = random_model(shape, args.device, positions=max(lengths))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, max(lengths)), generator=generator)
    ids = ids.to(model.device)
    for mode in modes:  # warm-up: kernels compiled, allocator primed
        prefill(model, ids[:, : min(lengths[0], 2 * args.chunk)], mode, args)
    rows, failed = [], set()  # a mode that ran out of memory skips its longer lengths
    for length in lengths:
        for mode in modes:
            if mode in failed:
                rows.append({"mode": mode, "length": length, "oom": True, "skipped": True})
                continue
            row = {"mode": mode, "length": length, **prefill(model, ids[:, :length], mode, args)}
            row["full_cache_bytes"] = full_cache_nbytes(model.config, length, 1, model.dtype)
            rows.append(row)
            if row["oom"]:
                failed.add(mode)
            peak = row.get("peak_bytes")
            text = (
                "out of memory"
                if row["oom"]
                else f"peak {(peak or 0) / 2**30:.2f} GiB, {row['tokens_per_s']:,.0f} tok/s"
            )
            print(f"{length:>8} {mode:8s} {text}", flush=True)
    weights = sum(p.nbytes for p in model.parameters())
    record = {
        **machine.header(
            "peak memory and prefill speed against prompt length: full, one-shot, chunked",
            "prefill_memory.py",
            argv,
            model.device,
        ),
        "model": NAMES[shape],
        "policy": args.policy,
        "budget": args.budget,
        "codec": args.codec,
        "chunk": args.chunk,
        "modes": modes,
        "weights_bytes": weights,
        "device_bytes": torch.cuda.get_device_properties(0).total_memory
        if args.device == "cuda"
        else None,
        "rows": rows,
        "longest": {
            mode: max(
                (r["length"] for r in rows if r["mode"] == mode and not r["oom"]), default=None
            )
            for mode in modes
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefill_memory_{shape}.json"
    write_json(path, record)
    if record["device_bytes"]:
        plot(record, path.with_suffix(".png"))
    print(f"longest prompt that fits: {record['longest']}; wrote {path}")
    return record


if __name__ == "__main__":
    main()
