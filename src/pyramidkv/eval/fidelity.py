"""Attention fidelity: per layer, how close the attention output stays when the past is compressed.

For each sample the context is prefilled once (:func:`~pyramidkv.eval.prefill.prefill`) and the continuation is
teacher-forced in chunks (as in :mod:`.perplexity`) twice: with the full cache, recording every attention
module's input and output, then with each configuration's cache. Forward hooks on
each decoder layer's ``self_attn`` (``model.model.layers[i].self_attn``) (registered for one run and removed after it) read the outputs; the score
of a layer is the cosine similarity of its output with the full cache's, per continuation token (the
module's output after the output projection, over the hidden dimension, in float64), averaged over tokens.

``isolate=True`` (the default) measures each layer on its own: a pre-hook feeds every attention module the
hidden states it received in the full-cache run, so queries and appended keys/values are identical and the
only difference left is what the compressed past holds — the attention-output cosine that FibQuant
(Lee & Kim 2026, arXiv 2605.11478) reports per codec rate. ``isolate=False`` lets the compressed run go its
own way, so layer ``l`` also carries the drift of layers below it: what the model really computes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager

import torch

from pyramidkv.errors import UnsupportedModelError
from pyramidkv.eval.perplexity import REFERENCE, PerplexityTask, collect, teacher_force
from pyramidkv.eval.prefill import prefill
from pyramidkv.eval.runner import Config


def attention_modules(model) -> list[torch.nn.Module]:
    """The ``self_attn`` module of every decoder layer, bottom first."""
    layers = getattr(model.get_decoder(), "layers", None)
    modules = [getattr(layer, "self_attn", None) for layer in layers or []]
    if not modules or any(m is None for m in modules):
        raise UnsupportedModelError(
            f"model: {type(model).__name__} has no model.layers[i].self_attn attention modules to hook"
        )
    return modules


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@contextmanager
def _hooked(modules, record: Callable, replace: Callable | None):
    """While open, ``record(layer, input, output)`` sees each attention call; ``replace(layer)`` (when given)
    returns the hidden states the module is fed instead of its own."""
    handles, seen = [], {}

    def before(index):
        def hook(module, args, kwargs):
            seen[index] = _hidden(args, kwargs)
            if replace is None:
                return None
            new = replace(index)
            seen[index] = new
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": new}
            return (new, *args[1:]), kwargs

        return hook

    def after(index):
        def hook(module, args, kwargs, output):
            record(index, seen.pop(index), output[0] if isinstance(output, tuple) else output)

        return hook

    try:
        for index, module in enumerate(modules):
            handles.append(module.register_forward_pre_hook(before(index), with_kwargs=True))
            handles.append(module.register_forward_hook(after(index), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows of (tokens, hidden) tensors, in float64 (1 when both are zero)."""
    a, b = a.double(), b.double()
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(norms > 0, dot / norms.clamp_min(1e-300), torch.ones_like(dot))


def measure_sample(
    model,
    window: torch.Tensor,
    configs: list[Config],
    task: PerplexityTask,
    sample: str = "0",
    isolate: bool = True,
) -> list[dict]:
    """One record per configuration: the per-layer mean cosine of attention outputs against the full cache."""
    modules = attention_modules(model)
    inputs = window[:, task.context : task.context + task.continuation]
    full_in: list[list[torch.Tensor]] = [[] for _ in modules]
    full_out: list[list[torch.Tensor]] = [[] for _ in modules]

    def keep(layer, hidden, output):
        full_in[layer].append(hidden)
        full_out[layer].append(output)

    records = []
    with torch.inference_mode():
        captured = prefill(model, window[:, : task.context])
        with (
            captured.cache(**REFERENCE.cache_options()) as cache,
            _hooked(modules, keep, None),
        ):
            for _ in teacher_force(model, cache, inputs, task.chunk):
                pass
        for config in configs:
            cosines: list[list[torch.Tensor]] = [[] for _ in modules]

            def compare(layer, hidden, output, cosines=cosines):
                chunk = full_out[layer][len(cosines[layer])]
                cosines[layer].append(_cosine(chunk.flatten(0, -2), output.flatten(0, -2)))

            def fed(layer, cosines=cosines):
                return full_in[layer][len(cosines[layer])]

            start = time.perf_counter()
            with captured.cache(**config.cache_options()) as cache:
                ratio = cache.memory_report()["ratio"]
                with _hooked(modules, compare, fed if isolate else None):
                    for _ in teacher_force(model, cache, inputs, task.chunk):
                        pass
            per_layer = [torch.cat(c) for c in cosines]
            records.append(
                {
                    "sample": sample,
                    **config.fields(),
                    "isolate": isolate,
                    "cosine": [c.mean().item() for c in per_layer],
                    "cosine_min": [c.min().item() for c in per_layer],
                    "ratio": ratio,
                    "seconds": time.perf_counter() - start,
                }
            )
    return records


def measure(
    model,
    windows: list[torch.Tensor],
    configs: list[Config],
    task: PerplexityTask,
    isolate: bool = True,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Records of every (window, configuration) pair; ``on_record`` sees each as it comes."""
    return collect(
        windows,
        lambda window, sample: measure_sample(model, window, configs, task, sample, isolate),
        on_record,
    )


def summarize(records: list[dict]) -> list[dict]:
    """One row per configuration: per-layer cosine averaged over samples, its mean over layers, the worst
    layer, and the smallest cosine of any single token."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[record["config"]].append(record)
    rows = []
    for found in groups.values():
        layers = len(found[0]["cosine"])
        cosine = [sum(r["cosine"][i] for r in found) / len(found) for i in range(layers)]
        worst = min(range(layers), key=cosine.__getitem__)
        first = found[0]
        rows.append(
            {
                **{k: first[k] for k in ("config", "policy", "budget", "codec", "isolate")},
                "n": len(found),
                "cosine": cosine,
                "mean_cosine": sum(cosine) / layers,
                "worst_layer": worst,
                "worst_cosine": cosine[worst],
                "min_token_cosine": min(min(r["cosine_min"]) for r in found),
                "ratio": sum(r["ratio"] for r in found) / len(found),
            }
        )
    return rows


def plot(rows: list[dict], path) -> None:
    """Mean attention-output cosine against layer, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        name = row["policy"] if row["policy"] == "full" else f"{row['policy']} {row['budget']}"
        name += "" if row["codec"] == "none" else f" +{row['codec']}"
        ax.plot(range(len(row["cosine"])), row["cosine"], marker=".", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine(attention output, full cache)")
    mode = "each layer fed the full run's inputs" if rows[0]["isolate"] else "end to end"
    ax.set_title(f"attention fidelity ({mode})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
