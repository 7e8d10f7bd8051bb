"""Quality against bytes: fixed configurations (policy x codec x bits) and the memory planner, each held to the
same byte budgets, from 1% to 30% of the prompt's fp16 cache (`pyramidkv frontier`, ``benchmarks/frontier.py``).

Each text window is prefilled once (:mod:`pyramidkv.eval.prefill`); every configuration at every budget is
rebuilt from that capture with ``kv_memory`` set to the share of the fp16 cache in bytes, so each cache holds at
most the same bytes whatever dtype the model runs in, and reads the window's continuation with its compressed
past. Quality is the KL divergence from the full cache, top-1 agreement and perplexity, means with 95% intervals
over windows; a planned configuration is compared with the best fixed one at each budget by the paired
difference of KL on the same windows (as RDKV and KVTuner compare allocations at equal bytes).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from pyramidkv.checks import check_int
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.distributed import World
from pyramidkv.eval.measure import _progress, _run_info, _windows, one_length
from pyramidkv.eval.results import write_json
from pyramidkv.eval.sweep import items

if TYPE_CHECKING:  # torch and the model code load when a frontier runs, not when the CLI starts
    import torch

    from pyramidkv.eval.perplexity import PerplexityTask

FIXED = (
    "snapkv/none,snapkv/fibquant:2,snapkv/fibquant:3,snapkv/fibquant:4,snapkv/uniform/fibquant:2"
)
PLANNED = "snapkv,pyramidkv-adaptive"
SHARES = "1,2,3,5,10,15,25,30"


@dataclass
class FrontierOptions:
    """What one frontier run asks for, validated before a model loads. ``fixed``: comma-separated
    ``policy/codec``; ``planned``: comma-separated ``policy`` (plan ``auto``) or ``policy@plan``
    (``snapkv@auto:3+4``); ``shares``: budgets in % of the prompt's fp16 cache."""

    fixed: str = FIXED
    planned: str = PLANNED
    shares: str = SHARES
    context: str = "2k"
    continuation: str = "64"
    chunk: int = 32
    samples: int = 20
    seed: int = 0
    text: Path | None = None
    configs: list[tuple[str, dict]] = field(init=False)
    budgets: list[float] = field(init=False)
    task: PerplexityTask = field(init=False)

    def __post_init__(self) -> None:
        from pyramidkv.eval.perplexity import PerplexityTask

        check_int("--samples", self.samples, 1)
        check_int("--chunk", self.chunk, 1)
        self.task = PerplexityTask(
            one_length(self.context, "--context"),
            one_length(self.continuation, "--continuation"),
            self.chunk,
        )
        self.budgets = [_share(s) for s in items(self.shares, "--shares")]
        self.configs = [_fixed(item) for item in items(self.fixed, "--fixed")] if self.fixed else []
        self.configs += (
            [_planned(i) for i in items(self.planned, "--planned")] if self.planned else []
        )
        if not self.configs:
            raise PyramidKVError("--fixed: give fixed configurations, --planned ones, or both")
        if self.text is not None and not Path(self.text).is_file():
            raise PyramidKVError(f"--text: {str(self.text)!r} is not a readable file")


def _share(text: str) -> float:
    try:
        share = float(text.removesuffix("%"))
    except ValueError:
        share = math.nan
    if not 0 < share <= 100:
        raise PyramidKVError(f"--shares: got {text!r}; expected percentages in (0, 100]")
    return share / 100


def _fixed(item: str) -> tuple[str, dict]:
    """``policy/codec`` -> (name, cache options), checked as an eval configuration would be."""
    from pyramidkv.eval.runner import Config

    policy, _, codec = item.partition("/")
    try:
        config = Config(policy, "kv1%", codec or "none")
    except PyramidKVError as exc:
        raise PyramidKVError(f"--fixed: {item!r}: {exc}") from None
    name = config.policy if config.codec == "none" else f"{config.policy} + {config.codec}"
    options = {"policy": config.policy}
    if config.codec != "none":
        options["codec"] = config.codec
    return name, options


def _planned(item: str) -> tuple[str, dict]:
    """``policy`` or ``policy@auto:3+4`` -> (name, cache options)."""
    from pyramidkv.eval.runner import Config

    policy, _, plan = item.partition("@")
    plan = plan or "auto"
    if not plan.startswith("auto"):
        raise PyramidKVError(f"--planned: {item!r}: the plan after '@' starts with auto (auto:3+4)")
    try:
        config = Config(policy, "kv1%", "plan" + plan.removeprefix("auto"))
    except PyramidKVError as exc:
        raise PyramidKVError(f"--planned: {item!r}: {exc}") from None
    name = f"plan {config.policy}" + ("" if plan == "auto" else f" {plan}")
    return name, {"policy": config.policy, "plan": plan}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (normal approximation over windows)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def measure_window(
    model, window: torch.Tensor, task: PerplexityTask, budgets: list[float], configs
) -> list[dict]:
    """One record per (configuration, budget) for one window, all from one prefill."""
    import torch

    from pyramidkv.cache.accounting import full_cache_nbytes
    from pyramidkv.eval.perplexity import REFERENCE, score, teacher_force
    from pyramidkv.eval.prefill import prefill

    context, chunk = task.context, task.chunk
    inputs = window[:, context : context + task.continuation]
    targets = window[0, context + 1 :].to(model.device)
    full = full_cache_nbytes(model.config, context, 1, torch.float16)
    records = []
    with torch.inference_mode():
        captured = prefill(model, window[:, :context])
        with captured.cache(**REFERENCE.cache_options()) as cache:
            reference = torch.cat([x.float() for x in teacher_force(model, cache, inputs, chunk)])
        for share in budgets:
            for name, options in configs:
                start = time.perf_counter()
                try:
                    cache = captured.cache(kv_memory=int(share * full), **options)
                except PyramidKVError as exc:  # below the configuration's smallest cache
                    records.append({"config": name, "share": share, "skipped": str(exc)})
                    continue
                with cache:
                    held = cache.memory_report()["prompt_bytes"]
                    found = score(model, cache, inputs, targets, chunk, reference)
                seconds = time.perf_counter() - start
                records.append(
                    {"config": name, "share": share, **found, "bytes": held,
                     "bytes_share": held / full, "seconds": seconds}
                )  # fmt: skip
    return records


def summarize(records: list[dict], planned: list[str]) -> list[dict]:
    """Per (configuration, budget): KL, top-1 and perplexity with intervals; for a planned configuration, its
    paired KL difference from the best fixed configuration at that budget (over the same windows)."""
    rows, by_key = [], {}
    for record in records:
        if "skipped" not in record:
            by_key.setdefault((record["config"], record["share"]), []).append(record)
    for (name, share), found in by_key.items():
        kl, kl_half = interval([r["kl"] for r in found])
        top1, top1_half = interval([r["top1"] for r in found])
        ppl, ppl_half = interval([r["ppl"] for r in found])
        rows.append(
            {
                "config": name, "share": share, "samples": len(found), "kl": kl, "kl_ci": kl_half,
                "top1": top1, "top1_ci": top1_half, "ppl": ppl, "ppl_ci": ppl_half,
                "bytes_share": max(r["bytes_share"] for r in found),
            }
        )  # fmt: skip
    for row in rows:
        fixed = [
            r for r in rows if r["share"] == row["share"] and r["config"] not in planned
            and r["samples"] == row["samples"]
        ]  # fmt: skip
        if row["config"] not in planned or not fixed:
            continue
        best = min(fixed, key=lambda r: r["kl"])
        theirs = {r["sample"]: r["kl"] for r in by_key[(best["config"], row["share"])]}
        diff, diff_half = interval(
            [r["kl"] - theirs[r["sample"]] for r in by_key[(row["config"], row["share"])]]
        )
        row.update(best_fixed=best["config"], best_fixed_kl=best["kl"], kl_vs_best=diff,
                   kl_vs_best_ci=diff_half, kl_ratio=row["kl"] / best["kl"])  # fmt: skip
    return sorted(rows, key=lambda r: (r["config"], r["share"]))


def plot(rows: list[dict], path: Path) -> None:
    """KL (log-log, with intervals) and top-1 agreement against bytes: planned solid, fixed dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in dict.fromkeys(r["config"] for r in rows):
        found = sorted((r for r in rows if r["config"] == name), key=lambda r: r["share"])
        x = [100 * r["share"] for r in found]
        style = "-o" if name.startswith("plan") else "--."
        left.errorbar(x, [r["kl"] for r in found], [r["kl_ci"] for r in found], fmt=style, label=name,
                      capsize=2)  # fmt: skip
        right.plot(x, [100 * r["top1"] for r in found], style, label=name)
    axis = "bytes, % of the fp16 cache"
    left.set(xscale="log", yscale="log", xlabel=axis, ylabel="KL from the full cache")
    right.set(xscale="log", xlabel=axis, ylabel="top-1 agreement, %")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frontier_table(rows: list[dict]) -> Table:
    table = Table(title="quality against bytes (95% intervals over windows)")
    for column in ("configuration", "bytes", "KL", "top-1", "vs best fixed (paired KL)"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for row in rows:
        versus = (
            f"{row['best_fixed']}: {row['kl_vs_best']:+.4f} ± {row['kl_vs_best_ci']:.4f} "
            f"(x{row['kl_ratio']:.2f})" if "best_fixed" in row else ""
        )  # fmt: skip
        table.add_row(
            row["config"], f"{100 * row['share']:g}%", f"{row['kl']:.4f} ± {row['kl_ci']:.4f}",
            f"{100 * row['top1']:.1f} ± {100 * row['top1_ci']:.1f}%", versus,
        )  # fmt: skip
    return table


def run_frontier(
    model,
    tokenizer,
    options: FrontierOptions,
    name: str,
    path: Path,
    console: Console,
    extra: dict | None = None,
    world: World | None = None,
) -> dict:
    """Measure every window, write the JSON to ``path`` (with ``extra``'s fields, e.g. the command) and the
    plot beside it, print the table. In a world of several processes each rank measures its share of the
    windows and rank 0 writes the result (the others return an empty dict)."""
    world = world or World()
    from pyramidkv.cache.accounting import check_positions

    task = options.task
    check_positions(
        model.config, task.length, "--context",
        f"{task.context:,} context and {task.continuation:,} continuation tokens",
    )  # fmt: skip
    windows = _windows(tokenizer, task.length, options.samples, options.seed, options.text)
    records, started = [], time.perf_counter()
    mine = world.shard(list(enumerate(windows)))
    with _progress(console) as progress:
        bar = progress.add_task("frontier", total=len(mine))
        for index, window in mine:
            found = measure_window(model, window, task, options.budgets, options.configs)
            records += [{"sample": index, **record} for record in found]
            progress.advance(bar)
    records = world.gather(records)
    if not world.main:
        return {}
    records.sort(key=lambda record: record["sample"])
    planned = [n for n, o in options.configs if "plan" in o]
    rows = summarize(records, planned)
    run = _run_info(
        model, name, samples=options.samples, seed=options.seed, context=task.context,
        continuation=task.continuation, chunk=task.chunk, shares=options.shares,
        text=str(options.text) if options.text else None, seconds=time.perf_counter() - started,
    )  # fmt: skip
    result = {**(extra or {}), "run": run, "rows": rows, "records": records}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    plot(rows, path.with_suffix(".png"))
    console.print(frontier_table(rows))
    console.print(f"wrote {path} and {path.with_suffix('.png')}")
    return result
