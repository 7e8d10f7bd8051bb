"""How much does compression add to prefill? Prefill time with the full cache and with each policy, the bytes
each cache holds afterwards, and on a GPU the prefill's peak memory.

    python benchmarks/prefill_overhead.py --lengths 1024,2048,4096 --budget 128 --repeats 3
    python benchmarks/prefill_overhead.py --model random:llama3-8b --lengths 8192,32768 --profile

``--model random:<shape>`` (:mod:`shapes`: ``smollm2``, ``llama3-8b``) times random weights of a real
architecture on random token ids: a prefill's kernels do not depend on the weights. A policy entry is a preset
name, or ``<preset>+plan`` for the memory planner under ``--kv-memory``, either with ``@layer`` to compress each
layer after its attention instead of all layers at the end of the forward (``compress_after``). Every forward asks for the last
position's logits only, as generation does. The policies take turns within each repeat; the table gives the
overhead of the medians and of the fastest runs (a host-bound prefill drifts with the host). ``--profile`` also records, per policy at the first length, the
kernels the compressed prefill launches beyond the full one and the operators that take the most host time;
``--trace DIR`` also writes each of those prefills' timeline (Chrome trace format, gzipped) for a viewer such as
Perfetto, where the device's idle gaps and the host work beside them show where the time goes.

Writes benchmarks/results/prefill_overhead_<device>[_<shape>].json and prints a table.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

import machine  # sibling script
from pyramidkv.cache.accounting import cache_nbytes
from pyramidkv.cache.compat import cache_kwargs
from pyramidkv.cache.compressed import CompressedCache
from pyramidkv.eval.corpus import shuffled_paragraphs
from pyramidkv.eval.results import write_json
from pyramidkv.models import load
from shapes import NAMES, random_model  # sibling script

POLICIES = (
    "full,pyramidkv,pyramidkv@layer,snapkv,snapkv@layer,pyramidkv-adaptive,pyramidkv-adaptive@layer,"
    "streamingllm,streamingllm@layer,h2o,snapkv+plan"
)


def load_model(name: str | None, device: str | None):
    """(model, prompt builder, model name): a random shape on random ids, or a real model on prose."""
    if name and name.startswith("random:"):
        shape = name.split(":", 1)[1]
        model = random_model(shape, device or ("cuda" if torch.cuda.is_available() else "cpu"))
        generator = torch.Generator().manual_seed(0)

        def prompt(length: int) -> torch.Tensor:
            return torch.randint(3, model.config.vocab_size, (1, length), generator=generator)

        return model, prompt, NAMES[shape]
    model, tokenizer = load(name, device=device)
    text = " ".join(shuffled_paragraphs(0))

    def prompt(length: int) -> torch.Tensor:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :length]
        if ids.shape[1] < length:
            raise SystemExit(f"corpus has only {ids.shape[1]} tokens")
        return ids

    return model, prompt, model.config.name_or_path or "embedded"


def make_cache(model, entry: str, args):
    if entry == "full":
        return DynamicCache(config=model.config)
    entry, _, after = entry.partition("@")
    policy, _, plan = entry.partition("+")
    options = {"compress_after": after} if after else {}
    if plan:
        return CompressedCache(model, policy, kv_memory=args.kv_memory, plan="auto", **options)
    return CompressedCache(model, policy, args.budget, **options)


def timed_prefill(model, ids, entry: str, args) -> tuple[float, int, int | None]:
    """Seconds of one prefill, the bytes the cache holds after it, and the prefill's peak device memory above
    what was allocated before it (None on a CPU)."""
    cache = make_cache(model, entry, args)
    cuda = ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids, logits_to_keep=1, **cache_kwargs(model, cache))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - before if cuda else None
    nbytes = cache_nbytes(cache)
    if entry != "full":
        cache.close()
    return seconds, nbytes, peak


def profile(model, ids, entry: str, args) -> dict:
    """Kernel launches and their device time, operator calls on the host (nested ones included), the kernels
    that take the most device time and the operators that take the most host time, of one prefill
    (torch.profiler)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if ids.is_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        timed_prefill(model, ids, entry, args)
    if args.trace is not None:
        args.trace.mkdir(parents=True, exist_ok=True)
        plain = args.trace / f"{entry.replace('@', '_at_').replace('+', '_')}_{ids.shape[1]}.json"
        prof.export_chrome_trace(str(plain))
        with plain.open("rb") as source, gzip.open(f"{plain}.gz", "wb") as target:
            shutil.copyfileobj(source, target)
        plain.unlink()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    busiest = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    operators = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    device_kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    device_kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return {
        "kernels": kernels,
        "host_operators": operators,
        "device_ms": sum(e.self_device_time_total for e in device_kernels) / 1e3,
        "top_kernels": [
            {"name": e.key[:120], "count": e.count, "device_ms": e.self_device_time_total / 1e3}
            for e in device_kernels[:15]
        ],
        "top_host_ops": [
            {"name": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
            for e in busiest
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--budget", default="128")
    parser.add_argument("--kv-memory", default="3%", help="the byte budget of '+plan' entries")
    parser.add_argument("--policies", default=POLICIES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--model", default=None, help="a model, or random:<shape> (smollm2, llama3-8b)"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--trace", type=Path, default=None, help="with --profile: write timelines here"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    model, prompt, name = load_model(args.model, args.device)
    entries = args.policies.split(",")
    if "full" not in entries:
        entries.insert(0, "full")
    rows, profiles = [], {}
    for length in map(int, args.lengths.split(",")):
        ids = prompt(length).to(model.device)
        for entry in entries:
            timed_prefill(model, ids, entry, args)  # warm-up
        # the policies take turns within each repeat, so the host's drift touches every one alike
        runs: dict[str, list] = {entry: [] for entry in entries}
        for _ in range(args.repeats):
            for entry in entries:
                runs[entry].append(timed_prefill(model, ids, entry, args))
        for entry in entries:
            found = runs[entry]
            rows.append(
                {
                    "length": length,
                    "policy": entry,
                    "budget": args.budget,
                    "prefill_s_median": statistics.median(s for s, _, _ in found),
                    "prefill_s_min": min(s for s, _, _ in found),
                    "prefill_s_runs": [s for s, _, _ in found],
                    "kv_bytes": found[0][1],
                    "peak_bytes": found[0][2],
                }
            )
            if args.profile and length == int(args.lengths.split(",")[0]):
                profiles[entry] = profile(model, ids, entry, args)
            print(f"{length} {entry}: {rows[-1]['prefill_s_median'] * 1e3:.1f} ms", flush=True)
    for row in rows:
        base = next(r for r in rows if r["length"] == row["length"] and r["policy"] == "full")
        row["overhead_vs_full"] = row["prefill_s_median"] / base["prefill_s_median"] - 1
        row["overhead_of_fastest"] = row["prefill_s_min"] / base["prefill_s_min"] - 1
    record = {
        **machine.header(
            "prefill time, cache bytes and peak memory with and without compression",
            "prefill_overhead.py",
            argv,
            model.device,
        ),
        "model": name,
        "dtype": str(model.dtype),
        "rows": rows,
        "profiles": profiles,
    }
    gpu = record["machine"]["gpu"]
    suffix = (
        f"_{args.model.split(':', 1)[1]}" if args.model and args.model.startswith("random:") else ""
    )
    path = args.out / f"prefill_overhead_{'cuda' if gpu else 'cpu'}{suffix}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    table = Table(
        title=f"prefill of {name} on {gpu or 'CPU'} ({record['dtype']}), budget {args.budget}"
    )
    for col in (
        "length",
        "policy",
        "prefill ms",
        "overhead",
        "fastest",
        "KV bytes",
        "peak MB",
        "kernels",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        peak = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 1e6:.0f}"
        kernels = (
            profiles.get(r["policy"], {}).get("kernels")
            if r["length"] == rows[0]["length"]
            else None
        )
        table.add_row(
            str(r["length"]), r["policy"], f"{r['prefill_s_median'] * 1e3:.1f}",
            f"{r['overhead_vs_full'] * 100:+.1f}%", f"{r['overhead_of_fastest'] * 100:+.1f}%",
            f"{r['kv_bytes']:,}", peak,
            "" if kernels is None else str(kernels),
        )  # fmt: skip
    Console().print(table)
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
