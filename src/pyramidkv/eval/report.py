"""Tables and plots from a results folder: what `pyramidkv eval` prints at the end and `pyramidkv report`
redraws from saved results.

* a rich table: accuracy per configuration and length with its 95% Wilson interval and sample count, and
  the bytes the compressed prompt holds as a share of the full cache — the full cache on the first row;
* ``heatmap_<task>_<mode>.png`` — accuracy over context length x needle depth, one panel per configuration,
  as in the PyramidKV paper (Cai et al. 2024, Fig. 6), for tasks laid out on a depth grid;
* ``budget_<task>_<mode>.png`` — accuracy against the budget, one line per policy, the full cache dashed;
* ``bytes_<task>_<mode>.png`` — accuracy against the bytes held, the full cache as a star.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from rich.table import Table


def budget_order(budget: str) -> tuple[int, float]:
    """Token budgets ascending, then percentages, then memory budgets (``kv3%``, ``kv48MiB``), then ``all``
    (the full cache)."""
    if budget.isdigit():
        return (0, float(budget))
    if budget.endswith("%") and not budget.startswith("kv"):
        return (1, float(budget[:-1]))
    if budget.startswith("kv"):
        from pyramidkv.budgets import parse_memory

        memory = parse_memory(budget[2:])
        return (2, memory.fraction) if memory.fraction is not None else (3, float(memory.nbytes))
    return (4, 0.0)


def config_name(policy: str, codec: str, chunk: int = 0, headroom: float = 1.0) -> str:
    """``pyramidkv``, ``pyramidkv+fibquant:2``, ``snapkv chunk 1024`` (a prompt prefilled in chunks) or
    ``snapkv chunk 1024x4`` (holding four times the budget until the prefill ends): how tables and plots name
    a configuration."""
    name = policy if codec == "none" else f"{policy}+{codec}"
    if not chunk:
        return name
    return f"{name} chunk {chunk}" + (f"x{headroom:g}" if headroom > 1 else "")


def _config(row: dict) -> tuple[str, str, str, tuple[int, float]]:
    """A row's configuration: policy, budget, codec, (prefill chunk, headroom) ((0, 1) where results predate
    chunks)."""
    chunk = (row.get("prefill_chunk") or 0, row.get("prefill_headroom") or 1.0)
    return row["policy"], row["budget"], row["codec"], chunk


def _config_order(rows: list[dict]) -> dict[tuple[str, str, str, tuple[int, float]], tuple]:
    policies = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"))
    return {
        _config(r): (
            r["policy"] != "full",
            policies.index(r["policy"]) if r["policy"] in policies else -1,
            budget_order(r["budget"]),
            r["codec"],
            _config(r)[3],
        )
        for r in rows
    }


def _split(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    by_task: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by_task[(row["task"], row["mode"])].append(row)
    return dict(sorted(by_task.items()))


def table(rows: list[dict], title: str = "accuracy") -> Table:
    """Accuracy % [95% interval] n per configuration and length, and kept bytes over full-cache bytes."""
    main = [r for r in rows if r["depth"] is None]
    lengths = sorted({r["length"] for r in main})
    out = Table(title=title)
    for column in ("task", "mode", "policy", "budget"):
        out.add_column(column)
    for length in lengths:
        out.add_column(f"{length} tok", justify="right", no_wrap=True)
    out.add_column("KV / full", justify="right")
    order = _config_order(main)
    for (task, mode), found in _split(main).items():
        cells: dict[tuple, dict[int, dict]] = defaultdict(dict)
        for row in found:
            cells[_config(row)][row["length"]] = row
        for config in sorted(cells, key=order.__getitem__):
            per_length = cells[config]
            entries = []
            for length in lengths:
                row = per_length.get(length)
                if row is None:
                    entries.append("")
                    continue
                low, high = row["ci95"]
                entries.append(
                    f"{100 * row['accuracy']:.0f} [{100 * low:.0f}-{100 * high:.0f}] n={row['n']}"
                )
            kept = sum(r["kv_bytes"] for r in per_length.values())
            full = sum(r["full_kv_bytes"] for r in per_length.values())
            policy, budget, codec, chunk = config
            name = config_name(policy, codec, *chunk)
            out.add_row(task, mode, name, budget, *entries, f"{100 * kept / max(full, 1):.1f}%")
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_heatmaps(rows: list[dict], folder: Path) -> list[Path]:
    """One figure per task x mode with depth rows: a length x depth accuracy panel per configuration."""
    import matplotlib.pyplot as plt

    written = []
    for (task, mode), found in _split([r for r in rows if r["depth"] is not None]).items():
        order = _config_order(found)
        configs = sorted({_config(r) for r in found}, key=order.get)
        lengths = sorted({r["length"] for r in found})
        depths = sorted({r["depth"] for r in found})
        columns = min(4, len(configs))
        lines = -(-len(configs) // columns)
        fig, axes = plt.subplots(
            lines,
            columns,
            figsize=(3.2 * columns + 1, 2.6 * lines + 0.8),
            squeeze=False,
            layout="constrained",
        )
        for ax in axes.flat[len(configs) :]:
            ax.axis("off")
        for ax, config in zip(axes.flat, configs, strict=False):
            grid = [[float("nan")] * len(lengths) for _ in depths]
            for r in found:
                if _config(r) == config:
                    grid[depths.index(r["depth"])][lengths.index(r["length"])] = r["accuracy"]
            image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
            name = config_name(config[0], config[2], *config[3])
            ax.set_title(name if config[0] == "full" else f"{name} {config[1]}")
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
        fig.supxlabel("context length (tokens)")
        fig.supylabel("needle depth")
        fig.suptitle(f"{task} ({mode})")
        path = folder / f"heatmap_{_safe(task)}_{mode}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def human_bytes(value: float, _position=None) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:g} {unit}"
        value /= 1000
    return f"{value:g} TB"


def _lines(rows: list[dict], folder: Path, x_of: str) -> list[Path]:
    """Accuracy against budget (``x_of="budget"``) or bytes (``"bytes"``), one panel per length."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    written = []
    for (task, mode), found in _split([r for r in rows if r["depth"] is None]).items():
        lengths = sorted({r["length"] for r in found})
        budgets = sorted({r["budget"] for r in found if r["policy"] != "full"}, key=budget_order)
        fig, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.4), squeeze=False)
        for ax, length in zip(axes[0], lengths, strict=True):
            here = [r for r in found if r["length"] == length]
            lines: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
            for r in here:
                policy, _, codec, chunk = _config(r)
                lines[(policy, codec, chunk)].append(r)
            for shift, ((policy, codec, chunk), points) in enumerate(lines.items()):
                points.sort(key=lambda r: budget_order(r["budget"]))
                ys = [r["accuracy"] for r in points]
                errors = [
                    [y - r["ci95"][0] for y, r in zip(ys, points, strict=True)],
                    [r["ci95"][1] - y for y, r in zip(ys, points, strict=True)],
                ]
                label = config_name(policy, codec, *chunk)
                if x_of == "bytes":
                    xs = [r["kv_bytes"] for r in points]
                    style = (
                        dict(marker="*", markersize=12) if policy == "full" else dict(marker="o")
                    )
                    ax.errorbar(xs, ys, yerr=errors, label=label, capsize=3, **style)
                elif policy == "full":
                    ax.axhline(ys[0], color="black", linestyle="--", label="full")
                    ax.axhspan(*points[0]["ci95"], color="black", alpha=0.08)
                else:
                    dodge = 0.04 * (shift - len(lines) / 2)  # keep equal points apart
                    xs = [budgets.index(r["budget"]) + dodge for r in points]
                    ax.errorbar(xs, ys, yerr=errors, label=label, marker="o", capsize=3)
            if x_of == "bytes":
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(FuncFormatter(human_bytes))
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_xlabel("KV bytes held (compressed prompt)")
            else:
                ax.set_xticks(range(len(budgets)), budgets)
                ax.set_xlabel("budget (tokens per layer)")
            ax.set_ylim(-0.05, 1.05)
            ax.set_ylabel("accuracy")
            ax.set_title(f"{length} tokens")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{task} ({mode}), 95% Wilson intervals")
        fig.tight_layout()
        path = folder / f"{x_of}_{_safe(task)}_{mode}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_all(rows: list[dict], folder: str | Path) -> list[Path]:
    """Every plot of the module docstring, written into ``folder``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    folder = Path(folder)
    return [
        *plot_heatmaps(rows, folder),
        *_lines(rows, folder, "budget"),
        *_lines(rows, folder, "bytes"),
    ]
