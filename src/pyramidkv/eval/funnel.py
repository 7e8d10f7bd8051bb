"""The attention funnel: "attention scatters low, focuses high", measured per layer for any model.

PyramidKV (Cai et al. 2024, arXiv 2406.02069, section 3) builds its shrinking budgets on one observation:
in lower layers attention spreads over the whole context, in higher layers it concentrates on a few tokens.
This module measures it. For each of the last ``queries`` positions ``p`` of a real-text prompt, each layer
and each query head, with ``n_p = p + 1`` visible tokens (causal) and attention ``a = softmax(q_p K^T *
scaling)`` over them:

* normalised entropy ``H(a) / log(n_p)`` — 1 for uniform attention, 0 for attention on one token;
* top-mass at ``x`` percent — the attention on the ``ceil(x n_p / 100)`` most-attended tokens (at least one).

Both are averaged over the queries and heads of a layer. Queries and keys come from one full prefill
(:func:`~pyramidkv.eval.prefill.prefill` captures them after RoPE, as attention sees them); with GQA query head
``h`` reads KV head ``h // (q_heads / kv_heads)``. Score soft-capping (Gemma 2) is not modelled.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pyramidkv.checks import check_int
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.prefill import prefill

PERCENTS = (1, 10)


def attention_funnel(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    last: int,
    percents: tuple[int, ...] = PERCENTS,
) -> dict[str, torch.Tensor]:
    """Per query head (q_heads,): normalised entropy and top-mass of the last ``last`` queries' attention.

    ``queries`` (batch, q_heads, n, dim), ``keys`` (batch, kv_heads, n, dim) of one causal prompt. Returns
    ``{"entropy": ..., "top1%": ..., "top10%": ...}`` (one ``top<x>%`` per percent), averaged over batch and
    queries, computed in float64.
    """
    batch, q_heads, n, _ = queries.shape
    kv_heads = keys.shape[1]
    if q_heads % kv_heads:
        raise PyramidKVError(f"keys: {kv_heads} KV heads do not divide {q_heads} query heads")
    check_int("queries", last, 1, n - 1)
    for x in percents:
        check_int("percents", x, 1, 100)
    keys = keys.double().repeat_interleave(q_heads // kv_heads, dim=1)
    q = queries[..., n - last :, :].double()
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scaling  # (b, h, last, n)
    positions = torch.arange(n - last, n, device=q.device)
    visible = torch.arange(n, device=q.device)[None, :] <= positions[:, None]  # (last, n)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    counts = positions + 1  # visible tokens of each query
    logs = torch.where(probs > 0, probs.log(), torch.zeros_like(probs))
    entropy = -(probs * logs).sum(-1) / counts.double().log()
    found = {"entropy": entropy.mean(dim=(0, 2))}
    tops = {x: (counts * x + 99) // 100 for x in percents}  # ceil(x n / 100) in integers, >= 1
    ranked = probs.topk(int(max(t.max() for t in tops.values())), dim=-1).values.cumsum(-1)
    for x, top in tops.items():
        index = (top - 1).view(1, 1, last, 1).expand(batch, q_heads, last, 1)
        found[f"top{x}%"] = ranked.gather(-1, index).squeeze(-1).mean(dim=(0, 2))
    return found


def measure_sample(
    model, window: torch.Tensor, last: int = 64, percents: tuple[int, ...] = PERCENTS
) -> dict[str, list[list[float]]]:
    """Per layer and query head, the funnel statistics of one prompt (1, n) from one full prefill."""
    with torch.inference_mode():
        captured = prefill(model, window)
    found: dict[str, list[list[float]]] = {}
    for queries, keys in zip(captured.queries, captured.keys, strict=True):
        stats = attention_funnel(queries, keys, captured.scaling, last, percents)
        for name, value in stats.items():
            found.setdefault(name, []).append(value.tolist())
    return found


def measure(
    model,
    windows: list[torch.Tensor],
    last: int = 64,
    percents: tuple[int, ...] = PERCENTS,
    on_sample: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One record per prompt: ``{"sample", "tokens", "entropy": [[per head] per layer], "top1%": ...}``."""
    records = []
    for index, window in enumerate(windows):
        record = {"sample": str(index), "tokens": window.shape[1], "queries": last}
        record.update(measure_sample(model, window, last, percents))
        records.append(record)
        if on_sample is not None:
            on_sample(record)
    return records


def summarize(records: list[dict]) -> list[dict]:
    """One row per layer: each statistic's mean over heads and prompts, and the std over prompts of the
    per-prompt head mean (ddof 1; 0 for one prompt)."""
    names = [k for k in records[0] if k == "entropy" or k.startswith("top")]
    rows = []
    for layer in range(len(records[0]["entropy"])):
        row: dict = {"layer": layer}
        for name in names:
            per_prompt = [sum(r[name][layer]) / len(r[name][layer]) for r in records]
            mean = sum(per_prompt) / len(per_prompt)
            spread = sum((v - mean) ** 2 for v in per_prompt) / max(len(per_prompt) - 1, 1)
            row[name], row[f"{name}_std"] = mean, math.sqrt(spread)
        rows.append(row)
    return rows


def plot(rows: list[dict], path, title: str = "") -> None:
    """Normalised entropy, and the top-mass shares, against depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.errorbar(layers, [r["entropy"] for r in rows], yerr=[r["entropy_std"] for r in rows])
    left.set_ylabel("attention entropy / log(visible tokens)")
    for name in (k for k in rows[0] if k.startswith("top") and not k.endswith("_std")):
        right.errorbar(
            layers, [r[name] for r in rows], yerr=[r[f"{name}_std"] for r in rows],
            label=f"mass on {name.removeprefix('top')} most-attended tokens", capsize=2,
        )  # fmt: skip
    right.set_ylabel("share of attention")
    right.set_ylim(0, 1.02)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xlabel("layer (bottom to top)")
    fig.suptitle(title or "attention funnel: scatters low, focuses high?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
