"""Where a cache's memory goes: tokens and bytes per layer and KV head after one prompt is compressed.

``pyramidkv plan -f document.txt --policy snapkv --kv-memory 5% --plan auto`` prefills the prompt into the
cache it describes and prints, per layer, the tokens each KV head keeps, the bytes the layer holds and the
tokens at each rate (whole, 4/3/2-bit codes), then draws the layers x heads map of kept tokens beside the
bytes per layer and rate. Adaptive schedules and shared heads decide these numbers from
the prompt's own attention, so the plan differs from prompt to prompt: this is how a user sees it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.table import Table

from pyramidkv.cache.compat import cache_kwargs


def measure_plan(model, ids: torch.Tensor, cache) -> dict:
    """Prefill ``ids`` (1, n) into ``cache`` and read its layout: kept tokens per layer and head, bytes per
    layer, and the totals of :meth:`~pyramidkv.cache.compressed.CompressedCache.memory_report`."""
    with torch.inference_mode():
        model(ids.to(model.device), **cache_kwargs(model, cache))
    report = cache.memory_report()
    return {
        "prompt_tokens": int(ids.shape[1]),
        "policy": report["policy"],
        "codec": report["codec"],
        "kept": [layer[0] for layer in report["kept_tokens"]],  # [layer][head], the first row
        "layer_bytes": [sum(parts.values()) for parts in report["layers"]],
        "prompt_bytes": report["prompt_bytes"],
        "prompt_full_bytes": report["prompt_full_bytes"],
        "prompt_share": report["prompt_share"],
        # [layer] -> {rate: [tokens per head of the first row], bytes}: what each rate holds
        "rates": [
            {_rate_name(r["bits"]): {"tokens": r["tokens"][0], "bytes": r["bytes"]} for r in layer}
            for layer in report["rates"]
        ],
    }


def _rate_name(bits: float | None) -> str:
    return "whole" if bits is None else f"{bits:g}-bit"


def _rates_text(rates: dict) -> str:
    """``whole 14 | 4-bit 20 | 2-bit 143``: tokens per rate (the first KV head's; heads share the counts of a
    planned layer)."""
    return " | ".join(f"{name} {found['tokens'][0]}" for name, found in rates.items())


def plan_table(plan: dict) -> Table:
    heads = len(plan["kept"][0])
    table = Table(
        title=f"{plan['policy']}, codec {plan['codec']}: {plan['prompt_tokens']} prompt tokens, "
        f"{plan['prompt_bytes']:,} bytes = {plan['prompt_share']:.1%} of the full cache"
    )
    table.add_column("layer", justify="right")
    for head in range(heads):
        table.add_column(f"head {head}", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("tokens per rate")
    rows = zip(plan["kept"], plan["layer_bytes"], plan["rates"], strict=True)
    for index, (kept, nbytes, rates) in enumerate(rows):
        table.add_row(str(index), *map(str, kept), f"{nbytes:,}", _rates_text(rates))
    return table


def plot_plan(plan: dict, path: Path) -> Path:
    """A layers x heads map of the tokens kept, with each layer's bytes beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    from pyramidkv.eval.report import human_bytes

    kept = torch.tensor(plan["kept"]).float()
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(8, 0.25 * len(plan["kept"]) + 2), gridspec_kw={"width_ratios": [3, 1]}
    )
    image = left.imshow(kept, aspect="auto", cmap="viridis")
    left.set(xlabel="KV head", ylabel="layer", title="tokens kept")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=left)
    names = list(dict.fromkeys(name for layer in plan["rates"] for name in layer))
    left_edge = [0] * len(plan["rates"])
    for name in names:  # the prompt's bytes per layer, stacked by rate
        held = [layer[name]["bytes"] if name in layer else 0 for layer in plan["rates"]]
        right.barh(range(len(held)), held, left=left_edge, label=name)
        left_edge = [a + b for a, b in zip(left_edge, held, strict=True)]
    if names:
        right.legend(fontsize=7)
    right.invert_yaxis()
    right.set(xlabel="prompt bytes", title="per layer and rate")
    right.xaxis.set_major_formatter(FuncFormatter(human_bytes))
    right.xaxis.set_major_locator(MaxNLocator(3))
    fig.suptitle(f"{plan['policy']}, {plan['codec']}: {plan['prompt_share']:.1%} of the full cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
