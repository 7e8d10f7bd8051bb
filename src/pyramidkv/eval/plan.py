"""Where a cache's memory goes: tokens and bytes per layer and KV head after one prompt is compressed.

``pyramidkv plan -f document.txt --policy pyramidkv-adaptive --kv-memory 5%`` prefills the prompt into the
cache it describes and prints, per layer, the tokens each KV head keeps and the bytes the layer holds, then
draws the layers x heads map of kept tokens. Adaptive schedules and shared heads decide these numbers from
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
    }


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
    for index, (kept, nbytes) in enumerate(zip(plan["kept"], plan["layer_bytes"], strict=True)):
        table.add_row(str(index), *map(str, kept), f"{nbytes:,}")
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
    right.barh(range(len(plan["layer_bytes"])), plan["layer_bytes"])
    right.invert_yaxis()
    right.set(xlabel="bytes", title="per layer")
    right.xaxis.set_major_formatter(FuncFormatter(human_bytes))
    right.xaxis.set_major_locator(MaxNLocator(3))
    fig.suptitle(f"{plan['policy']}, {plan['codec']}: {plan['prompt_share']:.1%} of the full cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
